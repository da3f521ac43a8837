# syntax=docker/dockerfile:1
# The REST service (`fer serve`) on port 8000, in two flavours built by the same steps:
#   cuda (the default target): for a GPU host; also serves on a CPU, with GBs of CUDA libraries unused.
#   cpu (`--target cpu`, compose's `fer-cpu`): PyTorch's CPU-only build on a slim Debian base.
# Weights are not in the image: they live in the /app/weights volume, filled once by
# `fer weights download PRESET` (docker-compose.yml does it).
#
# Layers: the dependencies, at the versions of docker/requirements.lock, are installed from their list
# (the `requirements` stage) and docker/ before the source is copied, so a source change rebuilds only
# the project's own layer. docker/install.sh is the one install command, shared with CI (.ci/run).
# `--build-arg FER_EXTRAS=ray`: the image with Ray (docker compose --profile ray, deploy/kuberay.yaml);
# empty by default, so the default image has no Ray.
#
# CUDA base: torch from PyPI (2.15, pinned in docker/constraints.txt) is a CUDA 13.2 build that brings
# its own CUDA user-space libraries (cuBLAS, cuDNN, NCCL, ... as nvidia-* wheels), so the image needs no
# CUDA toolkit: the `base` flavour of the matching CUDA release is enough. It sets what the NVIDIA
# container runtime reads (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES) and NVIDIA_REQUIRE_CUDA.
# The base's requirement (cuda>=13.2) would refuse R580 drivers, which report CUDA 13.0 but run any
# CUDA 13.x build by minor version compatibility (NVIDIA: CUDA 13.x needs a driver >= 580), so the
# cuda stage lowers it to cuda>=13.0: a host whose driver is too old for CUDA 13 still fails at start
# with the runtime's own message.
# The `runtime` and `cudnn-runtime` flavours would add a second, unused copy of those libraries (GBs).
ARG CUDA_BASE=nvidia/cuda:13.2.0-base-ubuntu24.04
ARG CPU_BASE=debian:trixie-slim

# The project's requirements alone (with those of FER_EXTRAS), so that an edit elsewhere in pyproject.toml
# leaves the images' dependency layers cached.
FROM ${CPU_BASE} AS requirements
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml docker/requirements.py ./
ARG FER_EXTRAS=""
RUN python3 requirements.py "$FER_EXTRAS" > requirements.txt

FROM ${CPU_BASE} AS cpu
COPY docker/system.sh /tmp/system.sh
RUN sh /tmp/system.sh && rm /tmp/system.sh
WORKDIR /src
COPY --from=requirements /src/requirements.txt ./
COPY docker/ docker/
ARG FER_EXTRAS=""
# PyPI's torch for Linux x86_64 is the CUDA build; PyTorch's own index has the same release without CUDA.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=cache,target=/root/.cache/pip sh docker/install.sh /opt/venv requirements.txt
COPY pyproject.toml README.md ./
COPY model/ model/
COPY service/ service/
COPY cli/ cli/
RUN --mount=type=cache,target=/root/.cache/pip sh docker/install.sh /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    FER_PRESET=exp-clip-b32 \
    FER_WEIGHTS_DIR=/app/weights \
    FER_DEVICE=auto
WORKDIR /app
# The Ray Serve configs, for `serve run deploy/serve.yaml` in the image with Ray (docs/ray.md).
COPY deploy/ deploy/
USER 10001:10001
VOLUME ["/app/weights"]
EXPOSE 8000
# /readyz answers 503 until the model is loaded and warmed up; urlopen raises on it (curl is not installed).
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
CMD ["fer", "serve", "--host", "0.0.0.0", "--port", "8000"]

# The same steps as the cpu stage (tests/test_docker.py keeps them in step), on the CUDA base.
FROM ${CUDA_BASE} AS cuda
COPY docker/system.sh /tmp/system.sh
RUN sh /tmp/system.sh && rm /tmp/system.sh
WORKDIR /src
COPY --from=requirements /src/requirements.txt ./
COPY docker/ docker/
ARG FER_EXTRAS=""
RUN --mount=type=cache,target=/root/.cache/pip sh docker/install.sh /opt/venv requirements.txt
COPY pyproject.toml README.md ./
COPY model/ model/
COPY service/ service/
COPY cli/ cli/
RUN --mount=type=cache,target=/root/.cache/pip sh docker/install.sh /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    FER_PRESET=exp-clip-b32 \
    FER_WEIGHTS_DIR=/app/weights \
    FER_DEVICE=auto \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0"
WORKDIR /app
COPY deploy/ deploy/
USER 10001:10001
VOLUME ["/app/weights"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
CMD ["fer", "serve", "--host", "0.0.0.0", "--port", "8000"]
