"""The container image, built and served: the team's build script (shared/tools/build-image.sh, podman on
a Debian stand-in for the base images) builds the Dockerfile, and compose's CPU profile (podman-compose)
serves the demo preset from it. Marked `image` (minutes, GBs of downloads): `python -m pytest -m image`,
which .ci/run runs as a step of its own; it skips, with the reason, where podman cannot run.

The `cpu` target takes torch from PyTorch's CPU index. Where that index cannot be reached, the test
builds the default (`cuda`) target instead, which serves on a CPU too, and says so."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from tests.support import free_port

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT.parent / "shared" / "tools" / "build-image.sh"
TAG = "localhost/exp-clip-fer:image-test"
PROJECT = "fer-image-test"
SERVICE = "fer-cpu"
CONTAINER_UID = "10001"


def torch_index() -> str:
    """The CPU target's torch index, as the Dockerfile sets it."""
    return re.search(r"^ARG TORCH_INDEX_URL=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M).group(1)


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/torch/", timeout=15):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def podman_compose() -> str:
    if not BUILD_SCRIPT.is_file():
        pytest.skip(
            f"the image test builds with the team's {BUILD_SCRIPT.relative_to(ROOT.parent)}: not here"
        )
    if shutil.which("podman") is None and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        pytest.skip(
            "podman is not installed and cannot be here (the build script installs it as root with apt)"
        )
    found = Path(sys.executable).parent / "podman-compose"
    if not found.is_file():
        pytest.skip("podman-compose is a [dev] dependency: pip install -e '.[dev]'")
    return str(found)


@pytest.fixture(scope="module")
def image(podman_compose, tmp_path_factory) -> str:
    target = "cpu"
    if not reachable(torch_index()):
        target = "cuda"
        warnings.warn(
            f"PyTorch's CPU index ({torch_index()}) cannot be reached from here: "
            "the image test builds and serves the cuda target instead of the cpu one",
            stacklevel=1,
        )
    logs = tmp_path_factory.mktemp("build")
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT), str(ROOT), TAG],
        env={**os.environ, "TARGET": target, "TMPDIR": str(logs)},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert result.returncode == 0, result.stdout + (logs / "fer_image_build.log").read_text()[-5000:]
    return TAG


@pytest.fixture(scope="module")
def served(image, podman_compose, tmp_path_factory):
    """compose's CPU profile up with the demo preset, its services on the image built above."""
    override = tmp_path_factory.mktemp("compose") / "image-test.yml"
    override.write_text(
        yaml.safe_dump({"services": {name: {"image": image} for name in ("weights-cpu", SERVICE)}})
    )
    port = free_port()
    compose = [podman_compose, "-p", PROJECT, "--profile", "cpu"]
    compose += ["-f", str(ROOT / "docker-compose.yml"), "-f", str(override)]
    env = {**os.environ, "FER_PRESET": "demo", "FER_PORT": str(port)}

    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([*compose, *args], env=env, capture_output=True, text=True, timeout=timeout)

    up = run("up", "-d", "--no-build", SERVICE)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if http.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError("not ready within 300 s:\n" + run("logs", SERVICE).stdout[-5000:])
                time.sleep(2)
            yield http, run
    finally:
        run("down", "-v", timeout=300)


def test_the_cpu_profile_serves_a_prediction_from_the_image(served):
    from skimage import data

    http, _ = served
    ready = http.get("/readyz").json()
    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, format="JPEG")
    response = http.post("/predict", files={"file": ("face.jpg", buffer.getvalue(), "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["face_detected"] and body["label"] in body["classes"], body
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-3
    assert body["model"] in str(ready)


def test_the_service_runs_as_the_image_s_unprivileged_user(served):
    _, run = served
    result = run("exec", "-T", SERVICE, "id", "-u")
    assert result.stdout.strip() == CONTAINER_UID, result.stdout + result.stderr
