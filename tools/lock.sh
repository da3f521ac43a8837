#!/usr/bin/env bash
# Regenerates docker/requirements.lock: every package that the project and each of its extras install,
# pinned, for every Python and platform pyproject.toml allows (CI's and both images'), within the bounds
# of pyproject.toml and docker/constraints.txt. docker/install.sh (the images, CI's own check) and .ci/run
# install through it.
#
#   tools/lock.sh                            # after editing dependencies: the pins already in the lock are
#                                            #   kept where still allowed; new packages get the newest release
#   tools/lock.sh --upgrade                  # on purpose: every package to the newest release allowed
#   tools/lock.sh --upgrade-package fastapi  # on purpose: one package (repeat the option for more)
#
# uv is a [dev] dependency; it resolves from PyPI (pip's configuration does not apply to it).
set -euo pipefail
cd "$(dirname "$0")/.."
uv=$(command -v uv || echo "$(dirname "$(command -v python3)")/uv")
[ -x "$uv" ] || { echo "tools/lock.sh needs uv, a [dev] dependency: pip install -e '.[dev]'" >&2; exit 1; }
exec "$uv" pip compile pyproject.toml --all-extras --universal --python-version 3.11 \
  --constraint docker/constraints.txt --custom-compile-command tools/lock.sh \
  --output-file docker/requirements.lock --quiet "$@"
