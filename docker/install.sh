#!/bin/sh
# Builds the service's virtual environment at $1 from the project in the current folder, every package
# at its version in docker/requirements.lock (tools/lock.sh writes it). The Dockerfile and CI (.ci/run)
# both run this one script, so the image installs what CI checked.
#   $2: a requirements file: those alone, not the project (the image's dependency layer, installed from
#     docker/requirements.py's list before the source is copied).
#   FER_EXTRAS (the Dockerfile's build argument, e.g. `ray`): the project's extras to install with it.
#   TORCH_INDEX_URL: a package index to take torch and torchvision from, at their locked versions (the
#     CPU image: PyTorch's CPU-only builds; PyPI's torchvision is built for PyPI's CUDA torch and does not
#     load beside another build); PyPI's otherwise.
set -eu
python3 -m venv "$1"
pip="$1/bin/pip install --disable-pip-version-check --constraint docker/requirements.lock"
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  # --no-deps: only these come from that index; what they need comes from PyPI with the rest.
  $pip --no-deps --index-url "$TORCH_INDEX_URL" torch torchvision
fi
if [ -n "${2:-}" ]; then
  $pip --requirement "$2"
else
  $pip ".${FER_EXTRAS:+[$FER_EXTRAS]}"
fi
