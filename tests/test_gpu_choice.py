"""Choosing a GPU: FER_DEVICE takes `cuda:N` as well as `cuda`, a GPU torch cannot see is one sentence
that says how many it sees, and a CUDA device of any number gets CUDA's defaults (float16)."""

from __future__ import annotations

import pytest
import torch

from cli.main import main
from model.settings import ModelSettings, device_for, dtype_for


@pytest.mark.parametrize(("given", "kept"), [("cuda:1", "cuda:1"), ("CUDA", "cuda"), ("cpu", "cpu")])
def test_a_numbered_gpu_is_a_valid_choice(monkeypatch, given, kept):
    monkeypatch.setenv("FER_DEVICE", given)
    assert ModelSettings().device == kept


def test_a_device_that_is_not_one_is_refused_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("FER_DEVICE", "gpu1")
    assert main(["predict", "face.jpg"]) == 2
    assert capsys.readouterr().err == (
        "fer: error: invalid FER_* configuration: FER_DEVICE: 'gpu1' is not a device: "
        "use auto, cpu, cuda or cuda:N (e.g. cuda:1)\n"
    )


def test_a_gpu_torch_cannot_see_says_how_many_it_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device_for("cuda:0") == "cuda:0"
    with pytest.raises(RuntimeError, match=r"FER_DEVICE=cuda:1 but torch sees 1 GPU\(s\), numbered from 0"):
        device_for("cuda:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(RuntimeError, match="FER_DEVICE=cuda:1 but torch sees no CUDA device"):
        device_for("cuda:1")


def test_a_numbered_gpu_gets_float16_by_default():
    assert dtype_for("auto", "cuda:1") == torch.float16
    assert dtype_for("float16", "cuda:0") == torch.float16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU that torch can see")
def test_the_engine_runs_on_the_last_gpu_named_by_number(tiny_clip_path, official_projection_path):
    from model.engine import create_engine
    from tests.support import face_image, tiny_settings

    last = f"cuda:{torch.cuda.device_count() - 1}"
    engine = create_engine(tiny_settings(tiny_clip_path, official_projection_path, device=last))
    assert str(engine.device) == last
    features = engine.encode_pixels(engine.prepare_many([face_image(0)]))
    assert features.device == torch.device(last) and torch.isfinite(features).all()
