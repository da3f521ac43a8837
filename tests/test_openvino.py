"""The OpenVINO backend (FER_BACKEND=openvino): its float32 answers are torch's, a restart reads the
encoders converted before, and the settings refuse what it cannot run. Tests that run OpenVINO skip,
saying so, where the optional extra is not installed."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from cli.main import main
from model.engine import create_engine
from model.pipeline import classify
from model.prompts import BASIC7
from model.settings import ModelSettings, device_for
from tests.support import encode_images, face_image, tiny_settings

TOLERANCE = 1e-4  # on probabilities, float32 against float32


@pytest.fixture(scope="module")
def openvino():
    return pytest.importorskip(
        "openvino", reason="needs the optional openvino extra: pip install '.[openvino]'"
    )


def probabilities(engine, images, prompt_set: str = "P-3") -> torch.Tensor:
    """Whole images through the pipeline's stages: prepare, encode, class features, scoring."""
    features = encode_images(engine, images)
    return classify(features, engine.class_features(BASIC7, prompt_set), BASIC7).probabilities


def assert_same_answers(torch_engine, openvino_engine, images) -> None:
    from model.openvino import OpenVinoClip

    assert isinstance(openvino_engine.clip, OpenVinoClip)  # not the torch module under another name
    assert openvino_engine.dtype == torch_engine.dtype == torch.float32
    for prompt_set in ("P-1", "P-3"):
        expected = probabilities(torch_engine, images, prompt_set)
        ours = probabilities(openvino_engine, images, prompt_set)
        torch.testing.assert_close(ours, expected, atol=TOLERANCE, rtol=0)


@pytest.fixture(scope="module")
def tiny_openvino(openvino, tiny_clip_path, official_projection_path, tmp_path_factory):
    cache = tmp_path_factory.mktemp("openvino")
    settings = tiny_settings(
        tiny_clip_path, official_projection_path, backend="openvino", openvino_cache=cache
    )
    return settings, create_engine(settings)


def test_the_tiny_model_answers_as_torch_does(engine, tiny_openvino):
    _, openvino_engine = tiny_openvino
    # One batch of several sizes: the batch dimension is dynamic.
    assert_same_answers(engine, openvino_engine, [face_image(i) for i in range(5)])
    assert_same_answers(engine, openvino_engine, [face_image(9)])


def test_a_restart_reads_the_converted_encoders(engine, tiny_openvino, monkeypatch, caplog):
    import model.openvino

    settings, _ = tiny_openvino
    (folder,) = settings.openvino_cache_dir.iterdir()  # made by the first start
    saved = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    assert sorted(saved) == ["image.bin", "image.xml", "text.bin", "text.xml"]

    def no_conversion(clip):
        raise AssertionError("converted again")

    monkeypatch.setattr(model.openvino, "convert_towers", no_conversion)
    with caplog.at_level("INFO", logger="model.openvino"):
        again = create_engine(settings)
    assert "read from the cache" in caplog.text
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == saved
    assert_same_answers(engine, again, [face_image(3)])


def test_the_cache_key_follows_the_weights_not_the_precision(openvino, tiny_openvino):
    from model.clip import load_clip
    from model.openvino import weights_key

    settings, _ = tiny_openvino
    clip = load_clip(settings.resolve())
    key = weights_key(clip)
    assert weights_key(clip) == key
    with torch.no_grad():
        next(clip.model.parameters())[0, 0] += 1e-3
    assert weights_key(clip) != key


def test_a_bfloat16_start_reads_what_a_float32_start_converted(tiny_openvino, monkeypatch, caplog):
    """The saved towers are the float32 conversion whatever the precision, which is applied when
    compiling: a second precision costs no second conversion and no second folder."""
    import model.openvino

    settings, _ = tiny_openvino  # a float32 start converted into its cache
    (folder,) = settings.openvino_cache_dir.iterdir()

    def no_conversion(clip):
        raise AssertionError("converted again")

    monkeypatch.setattr(model.openvino, "convert_towers", no_conversion)
    with caplog.at_level("INFO", logger="model.openvino"):
        bf16 = create_engine(settings.model_copy(update={"dtype": "bfloat16"}))
    assert "read from the cache" in caplog.text
    assert list(settings.openvino_cache_dir.iterdir()) == [folder]
    assert bf16.dtype == torch.bfloat16 and bf16.clip.precision == "bf16"  # OpenVINO's compile hint


def test_fer_predict_runs_on_openvino(
    model_env, engine, tiny_openvino, tmp_path, monkeypatch, capsys, caplog
):
    """The command line builds its engine from FER_BACKEND, like every entry point (create_engine)."""
    settings, _ = tiny_openvino  # the same CLIP weights as model_env's: its converted encoders serve
    monkeypatch.setenv("FER_BACKEND", "openvino")
    monkeypatch.setenv("FER_OPENVINO_CACHE", str(settings.openvino_cache_dir))
    face_image(4).save(tmp_path / "a.png")
    with caplog.at_level("INFO", logger="model.openvino"):
        assert main(["predict", str(tmp_path / "a.png")]) == 0
    assert "OpenVINO encoders read from the cache" in caplog.text
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    from model.media import decode_image

    features = encode_images(engine, [decode_image((tmp_path / "a.png").read_bytes())])
    expected = classify(features, engine.class_features(BASIC7, "P-3"), BASIC7).as_dict(0)
    assert row["probabilities"] == pytest.approx(expected, abs=TOLERANCE)


def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_model(
    openvino, engine, tiny_clip_path, official_projection_path, tmp_path, caplog
):
    (tmp_path / "a-file").write_text("")
    cache = tmp_path / "a-file" / "openvino"  # under a file: no folder can be made there
    settings = tiny_settings(
        tiny_clip_path, official_projection_path, backend="openvino", openvino_cache=cache
    )
    with caplog.at_level("WARNING", logger="model.openvino"):
        openvino_engine = create_engine(settings)
    assert "the OpenVINO encoders are not cached" in caplog.text
    assert_same_answers(engine, openvino_engine, [face_image(5)])


def test_a_damaged_cache_is_converted_again_with_a_warning(engine, tiny_openvino, tmp_path, caplog):
    import shutil

    settings, _ = tiny_openvino
    (folder,) = settings.openvino_cache_dir.iterdir()
    shutil.copytree(folder, tmp_path / folder.name)
    (tmp_path / folder.name / "image.xml").write_text("cut short")
    with caplog.at_level("INFO", logger="model.openvino"):
        again = create_engine(settings.model_copy(update={"openvino_cache": tmp_path}))
    assert "cannot read the cached OpenVINO encoders" in caplog.text and "converting" in caplog.text
    assert_same_answers(engine, again, [face_image(6)])


@pytest.mark.slow
def test_vit_b32_answers_as_torch_does(openvino, tmp_path):
    """Exp-CLIP B/32's shapes with random weights: the full-size towers convert and agree."""
    fields = {"clip_model": "ViT-B-32", "clip_weights": "random", "projection": "random", "device": "cpu"}
    torch_engine = create_engine(ModelSettings(**fields, dtype="float32"))
    openvino_engine = create_engine(
        ModelSettings(**fields, dtype="float32", backend="openvino", openvino_cache=tmp_path)
    )
    assert_same_answers(torch_engine, openvino_engine, [face_image(i, (240, 200)) for i in range(4)])


# ---- what the settings refuse (no OpenVINO, no GPU needed) -----------------------------------------
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_openvino_on_cuda_is_refused_with_one_sentence(device):
    with pytest.raises(
        ValidationError, match=f"FER_BACKEND=openvino runs on the CPU, not FER_DEVICE={device}"
    ):
        ModelSettings(backend="openvino", device=device)


def test_auto_is_the_cpu_for_openvino():
    assert device_for("auto", "openvino") == "cpu"


def test_a_missing_extra_names_the_install_command(monkeypatch, capsys):
    import model.settings

    monkeypatch.setattr(model.settings, "openvino_installed", lambda: False)
    monkeypatch.setenv("FER_BACKEND", "openvino")
    assert main(["predict", "nothing.png"]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("needs the optional openvino extra: pip install '.[openvino]'")
    assert len(err.splitlines()) == 1
    ModelSettings(backend="torch")  # the torch backend does without it
