"""Shared fixtures: tiny random CLIP + random official-format projection, saved to files and loaded
through the same code a real checkpoint takes; synthetic images and videos made with PIL and PyAV."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import ClassVar

import av
import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from bench import SHARED_DATA
from bench.server import free_port
from model.registry import open_clip_models

open_clip = open_clip_models()  # with the bundled fer-tiny architecture registered

SHARED_DOCS = SHARED_DATA.parent / "docs"


def needs_shared(path: Path, what: str) -> pytest.MarkDecorator:
    """Skips a test whose development files (kept beside the repository, never in it) are not on this
    machine, with a reason that says what they are and where they would be."""
    where = os.path.relpath(path, Path(__file__).resolve().parents[1])
    return pytest.mark.skipif(
        not path.exists(),
        reason=f"needs {what}: the team's development files, kept outside the repository at {where}, "
        "are not on this machine",
    )


TINY_MODEL = "fer-tiny"
PROJECTION_DIM = 4096
INDEX_BITS = 12  # frame index written as 12 black/white cells, robust to lossy codecs


@pytest.fixture(scope="session", autouse=True)
def float32_encoders():
    """Tests compare the engine with float32 computations of their own, so the encoders run in float32
    unless a test asks otherwise (test_engine's dtype tests do). Subprocesses inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FER_DTYPE", "float32")
        yield


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory) -> Path:
    """A random-weight tiny CLIP state dict, as a user's local checkpoint file would be."""
    torch.manual_seed(1234)
    model = open_clip.create_model(TINY_MODEL, pretrained=None)
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def official_projection_path(tmp_path_factory) -> Path:
    """A random W saved exactly like the official checkpoints: torch.save dict, key ends in mlp.weight."""
    generator = torch.Generator().manual_seed(99)
    embed_dim = open_clip.get_model_config(TINY_MODEL)["embed_dim"]
    weight = torch.randn(PROJECTION_DIM, embed_dim, generator=generator) * 0.1
    path = tmp_path_factory.mktemp("proj") / "ExpCLIP_tiny_model.pth"
    torch.save({"module.projection_head.mlp.weight": weight}, path)
    return path


@pytest.fixture(scope="session")
def full_size_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """A random-weight ViT-B-32 state dict and a random official-format 4096x512 projection: Exp-CLIP
    B/32's shapes, built once for the slow tests that run the real sizes."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vit-b-32")
    torch.save(open_clip.create_model("ViT-B-32", pretrained=None).state_dict(), folder / "vit-b-32.pt")
    torch.save({"module.mlp.weight": torch.randn(4096, 512) * 0.05}, folder / "ExpCLIP_B32_model.pth")
    return folder / "vit-b-32.pt", folder / "ExpCLIP_B32_model.pth"


@pytest.fixture
def model_env(monkeypatch, tiny_clip_path, official_projection_path, tmp_path):
    """FER_* settings pointing at the tiny model files, as a user would set them."""
    env = {
        "FER_CLIP_MODEL": TINY_MODEL,
        "FER_CLIP_WEIGHTS": str(tiny_clip_path),
        "FER_PROJECTION": str(official_projection_path),
        "FER_PREPROCESS": "exp-clip",
        "FER_DEVICE": "cpu",
        "FER_WEIGHTS_DIR": str(tmp_path / "weights"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def tiny_settings(clip_path: Path, projection_path: Path | str, **fields):
    """ModelSettings for the tiny model files on the CPU, exp-clip preprocessing (`fields` override;
    FER_DTYPE from the environment unless given). `projection_path` may be "none"."""
    from model.settings import ModelSettings

    defaults = {"preprocess": "exp-clip", "device": "cpu"}
    return ModelSettings(
        clip_model=TINY_MODEL,
        clip_weights=str(clip_path),
        projection=str(projection_path),
        **defaults | fields,
    )


@pytest.fixture(scope="session")
def engine(tiny_clip_path, official_projection_path):
    from model.engine import create_engine

    return create_engine(tiny_settings(tiny_clip_path, official_projection_path))


@pytest.fixture(scope="module")
def demo_client():
    """The real app on the demo preset (the tiny random CLIP, no face detector), loaded and ready."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import ServiceSettings

    app = create_app(ServiceSettings(preset="demo", device="cpu", face_detector="none", max_wait_ms=5))
    with TestClient(app) as client:
        wait_ready(client)
        yield client


def encode_images(engine, images) -> torch.Tensor:
    """Projected features of whole images, through the pipeline's prepare and direct-encode stages."""
    from model.pipeline import encode_in_batches

    return encode_in_batches(engine.encode_pixels, engine.prepare_many(images), 64)


def encode_clip(engine, frames) -> torch.Tensor:
    """A clip's pooled feature from its frames."""
    from model.pipeline import pool

    return pool(encode_images(engine, frames))


def wait_ready(client) -> None:
    """Polls /readyz of a (TestClient) app until the background load is done; fails if it never is."""
    for _ in range(200):
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"never ready: {client.get('/readyz').json()}")


class DeviceFeatures(torch.Tensor):
    """Stands for a tensor on a GPU (none here): records the threads that copy it to the CPU."""

    copied_in: ClassVar[list[str]] = []

    def cpu(self, *args, **kwargs):
        DeviceFeatures.copied_in.append(threading.current_thread().name)
        return self.as_subclass(torch.Tensor).clone()


def run_bounded(coro: Coroutine, seconds: float = 60.0):
    """`asyncio.run` with a deadline: a test that waits on the app's state fails instead of hanging."""
    return asyncio.run(asyncio.wait_for(coro, seconds))


@contextmanager
def fer_serve(
    env: dict, *args: str, ready_path: str = "/readyz"
) -> Iterator[tuple[httpx.Client, subprocess.Popen]]:
    """`fer serve` in a subprocess on a free loopback port, with `env` over this process's environment;
    yields (httpx client, process) once `ready_path` answers 200, and fails if it never does."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "cli.main",
        "serve",
        "--port",
        str(port),
        "--log-level",
        "warning",
        *args,
    ]
    server = subprocess.Popen(command, env={**os.environ, **env})
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            for _ in range(600):
                try:
                    if http.get(ready_path).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert server.poll() is None, "fer serve exited"
                time.sleep(0.2)
            else:
                raise AssertionError(f"fer serve was not ready within 120 s ({ready_path})")
            yield http, server
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(30)


def face_image(seed: int = 0, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A random colour image; content does not matter to a random model, determinism does."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def index_frame(index: int, size: int = 64) -> np.ndarray:
    """An RGB frame whose pixels spell `index` in binary: one 16x16 cell per bit."""
    frame = np.zeros((size, size, 3), dtype=np.uint8)
    cell = size // 4
    for bit in range(INDEX_BITS):
        if index >> bit & 1:
            row, col = divmod(bit, 4)
            frame[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell] = 255
    return frame


def read_index(image: Image.Image) -> int:
    pixels = np.asarray(image.convert("L").resize((64, 64)), dtype=np.float32)
    value = 0
    for bit in range(INDEX_BITS):
        row, col = divmod(bit, 4)
        if pixels[row * 16 + 4 : row * 16 + 12, col * 16 + 4 : col * 16 + 12].mean() > 127:
            value |= 1 << bit
    return value


def make_video(
    path: Path, n_frames: int, *, fps: int = 25, codec: str = "libx264", gop: int = 25, size: int = 64
) -> Path:
    """A clip whose frame i shows i in binary (see `index_frame`)."""
    pix_fmt = {"gif": "rgb8", "mpeg4": "yuv420p"}.get(codec, "yuv420p")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps, 1))
        stream.width = stream.height = size
        stream.pix_fmt = pix_fmt
        if codec not in ("gif",):
            stream.codec_context.gop_size = gop
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "18"}
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(index_frame(i, size), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def two_faces() -> tuple[bytes, list[list[int]]]:
    """The astronaut photo (a real face shipped with scikit-image) pasted twice at known places: PNG
    bytes and each face's expected [x, y, side], largest first."""
    from skimage import data as skimage_data

    face = Image.fromarray(skimage_data.astronaut())
    canvas = Image.new("RGB", (1000, 560), "gray")
    canvas.paste(face.resize((420, 420)), (20, 60))
    canvas.paste(face.resize((500, 500)), (480, 30))
    # astronaut's face is near (177, 67, 93, 93) in the 512 px original
    expected = [
        [480 + 177 * 500 // 512, 30 + 67 * 500 // 512, 91],
        [20 + 177 * 420 // 512, 60 + 67 * 420 // 512, 76],
    ]
    return png(canvas), expected
