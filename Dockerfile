# syntax=docker/dockerfile:1
# The REST service (`fer serve`) on port 8000. Weights are not in the image: they live in the
# /app/weights volume, filled once by `fer weights download PRESET` (docker-compose.yml does it).
#
# Base image: torch from PyPI (2.15, pinned in docker/constraints.txt) is a CUDA 13.2 build that brings
# its own CUDA user-space libraries (cuBLAS, cuDNN, NCCL, ... as nvidia-* wheels), so the image needs no
# CUDA toolkit: the `base` flavour of the matching CUDA release is enough. It sets what the NVIDIA
# container runtime reads (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES) and NVIDIA_REQUIRE_CUDA.
# The base's requirement (cuda>=13.2) would refuse R580 drivers, which report CUDA 13.0 but run any
# CUDA 13.x build by minor version compatibility (NVIDIA: CUDA 13.x needs a driver >= 580), so the
# final stage lowers it to cuda>=13.0: a host whose driver is too old for CUDA 13 still fails at start
# with the runtime's own message.
# The `runtime` and `cudnn-runtime` flavours would add a second, unused copy of those libraries (GBs).
ARG CUDA_BASE=nvidia/cuda:13.2.0-base-ubuntu24.04

FROM ${CUDA_BASE} AS builder
ENV DEBIAN_FRONTEND=noninteractive
# Distribution packages are not version-pinned: the base image tag fixes the Ubuntu release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/ docker/
COPY model/ model/
COPY service/ service/
COPY cli/ cli/
# `--build-arg FER_EXTRAS=ray`: the image with Ray (docker compose --profile ray, deploy/kuberay.yaml);
# empty by default, so the default image has no Ray. docker/install.sh reads it.
ARG FER_EXTRAS=""
# The one install command, shared with CI: .ci/run runs the same script in a fresh virtual environment.
RUN --mount=type=cache,target=/root/.cache/pip sh docker/install.sh /opt/venv

FROM ${CUDA_BASE}
ENV DEBIAN_FRONTEND=noninteractive
# The virtual environment's python is a link to this interpreter, so both stages install the same one.
# libgl1, glib, libsm6, libxext6: what the opencv-python wheel links against (it is the one OpenCV the
# face detector's package allows; the -headless build needs none of them).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libgl1 libglib2.0-0t64 libsm6 libxext6 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 fer \
    && useradd --create-home --uid 10001 --gid fer fer \
    && mkdir -p /app/weights \
    && chown fer:fer /app/weights
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0" \
    PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    FER_PRESET=exp-clip-b32 \
    FER_WEIGHTS_DIR=/app/weights \
    FER_DEVICE=auto
WORKDIR /app
# The Ray Serve configs, for `serve run deploy/serve.yaml` in the image with Ray (docs/ray.md).
COPY deploy/ deploy/
# Numeric, so a host or an orchestrator can tell it is not root without reading /etc/passwd.
USER 10001:10001
VOLUME ["/app/weights"]
EXPOSE 8000
# /readyz answers 503 until the model is loaded and warmed up; urlopen raises on it (curl is not installed).
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
CMD ["fer", "serve", "--host", "0.0.0.0", "--port", "8000"]
