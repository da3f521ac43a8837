"""Shared fixtures: tiny random CLIP + random official-format projection, saved to files and loaded
through the same code a real checkpoint takes; synthetic images and videos made with PIL and PyAV."""

from __future__ import annotations

import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import ClassVar

import av
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import model.clip  # noqa: F401  (registers the bundled fer-tiny architecture with open_clip)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_DOCS = SHARED_DATA.parent / "docs"
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
    from model.config import ModelSettings

    defaults = {"preprocess": "exp-clip", "device": "cpu"}
    return ModelSettings(
        clip_model=TINY_MODEL,
        clip_weights=str(clip_path),
        projection=str(projection_path),
        **defaults | fields,
    )


@pytest.fixture(scope="session")
def engine(tiny_clip_path, official_projection_path):
    from model.engine import FerEngine

    return FerEngine.from_settings(tiny_settings(tiny_clip_path, official_projection_path))


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
