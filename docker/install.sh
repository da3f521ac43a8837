#!/bin/sh
# Builds the service's virtual environment at $1 from the project in the current folder.
# The Dockerfile and CI (.ci/run) both run this one script, so the image installs what CI checked.
set -eu
python3 -m venv "$1"
# FER_EXTRAS (the Dockerfile's build argument, e.g. `ray`): the project's extras to install with it.
"$1/bin/pip" install --disable-pip-version-check --constraint docker/requirements.lock ".${FER_EXTRAS:+[$FER_EXTRAS]}"
