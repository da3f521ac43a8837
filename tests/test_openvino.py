"""The OpenVINO backend (FER_BACKEND=openvino): its float32 answers are torch's, a restart reads the
encoders converted before, and the settings refuse what it cannot run. Tests that run OpenVINO skip,
saying so, where the optional extra is not installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

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
SAVED = ["image.bin", "image.xml", "text.bin", "text.xml"]  # a cache folder's files


@pytest.fixture(scope="module")
def openvino():
    return pytest.importorskip(
        "openvino", reason="needs the optional openvino extra: pip install '.[openvino]'"
    )


def forbid_conversion(monkeypatch) -> None:
    """A start from here on must read the cache: converting fails the test."""
    import model.openvino

    def no_conversion(clip, normaliser):
        raise AssertionError("converted again")

    monkeypatch.setattr(model.openvino, "convert_towers", no_conversion)


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


def test_the_image_encoder_takes_the_uint8_pixels(tiny_openvino, monkeypatch):
    """Normalisation runs in the converted graph: no torch work (and no float copy of the pixels) comes
    before the encoder call, which a one-image request waits on whole."""
    _, openvino_engine = tiny_openvino
    seen = []
    infer = openvino_engine.clip._infer
    monkeypatch.setattr(
        openvino_engine.clip, "_infer", lambda tower, x: seen.append(x.dtype) or infer(tower, x)
    )
    monkeypatch.setattr(openvino_engine, "normaliser", None)  # the torch normaliser is not called
    encode_images(openvino_engine, [face_image(2)])
    assert seen == [torch.uint8]


def test_clip_standardisation_answers_as_torch_does(openvino, tiny_clip_path, tmp_path):
    """`clip` preprocessing (CLIP's mean and std) as well as `exp-clip`'s (the tiny fixture's): each is
    converted into the graph and keyed apart, so one cache folder never serves the other."""
    cache = tmp_path / "openvino"
    torch_engine = create_engine(tiny_settings(tiny_clip_path, "none", preprocess="clip"))
    openvino_engine = create_engine(
        tiny_settings(tiny_clip_path, "none", preprocess="clip", backend="openvino", openvino_cache=cache)
    )
    assert_same_answers(torch_engine, openvino_engine, [face_image(i) for i in range(3)])
    create_engine(tiny_settings(tiny_clip_path, "none", backend="openvino", openvino_cache=cache))
    assert len(list(cache.iterdir())) == 2


def test_a_restart_reads_the_converted_encoders(engine, tiny_openvino, monkeypatch, caplog):
    settings, first = tiny_openvino
    assert first.backend == "openvino" and engine.backend == "torch"  # what the ready line names
    (folder,) = settings.openvino_cache_dir.iterdir()  # made by the first start
    saved = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    assert sorted(saved) == SAVED
    forbid_conversion(monkeypatch)
    with caplog.at_level("INFO", logger="model.openvino"):
        again = create_engine(settings)
    assert "read from the cache" in caplog.text
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == saved
    assert_same_answers(engine, again, [face_image(3)])


def test_the_cache_key_follows_the_weights_not_the_precision(openvino, tiny_openvino):
    from model.clip import Normaliser, load_clip
    from model.openvino import weights_key

    settings, _ = tiny_openvino
    clip = load_clip(settings.resolve())
    normaliser = Normaliser(settings.resolve().preprocess, clip.preprocess)
    key = weights_key(clip, normaliser)
    assert weights_key(clip, normaliser) == key
    with torch.no_grad():
        next(clip.model.parameters())[0, 0] += 1e-3
    assert weights_key(clip, normaliser) != key


def test_a_bfloat16_start_reads_what_a_float32_start_converted(tiny_openvino, monkeypatch, caplog):
    """The saved towers are the float32 conversion whatever the precision, which is applied when
    compiling: a second precision costs no second conversion and no second folder."""
    settings, _ = tiny_openvino  # a float32 start converted into its cache
    (folder,) = settings.openvino_cache_dir.iterdir()
    forbid_conversion(monkeypatch)
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


def cut_in_half(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# How a cache folder is found damaged, and what its warning says of it (None: OpenVINO's words).
DAMAGES = {
    "a missing .bin": (lambda folder: (folder / "image.bin").unlink(), "missing image.bin"),
    "a cut .xml": (lambda folder: (folder / "image.xml").write_text("cut short"), None),
    "a cut .bin": (lambda folder: cut_in_half(folder / "text.bin"), None),
    "an empty folder": (lambda folder: [path.unlink() for path in folder.iterdir()], "missing"),
}


def damaged_cache(settings, tmp_path, damage: str):
    """A copy of the converted tiny model's cache folder, damaged; the settings that use the copy."""
    (converted,) = settings.openvino_cache_dir.iterdir()
    folder = tmp_path / "cache" / converted.name
    shutil.copytree(converted, folder)
    DAMAGES[damage][0](folder)
    return settings.model_copy(update={"openvino_cache": folder.parent}), folder


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_cache_is_converted_with_a_warning_and_replaced(
    engine, tiny_openvino, tmp_path, monkeypatch, caplog, damage
):
    from model.openvino import CONVERTING, READ_FROM_CACHE

    settings, folder = damaged_cache(tiny_openvino[0], tmp_path, damage)
    with caplog.at_level("INFO", logger="model.openvino"):
        again = create_engine(settings)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "cannot read the cached OpenVINO encoders" in warning and str(folder) in warning
    assert DAMAGES[damage][1] is None or DAMAGES[damage][1] in warning
    assert CONVERTING in caplog.text
    assert_same_answers(engine, again, [face_image(6)])
    # Replaced whole, nothing set aside left behind, so the next start reads it.
    assert list(folder.parent.iterdir()) == [folder]
    assert sorted(path.name for path in folder.iterdir()) == SAVED
    caplog.clear()
    forbid_conversion(monkeypatch)
    with caplog.at_level("INFO", logger="model.openvino"):
        create_engine(settings)
    assert READ_FROM_CACHE in caplog.text and "WARNING" not in caplog.text


def test_a_start_that_loses_the_race_to_replace_a_damaged_folder_keeps_the_winners(
    engine, tiny_openvino, tmp_path, monkeypatch, caplog
):
    """Two starts found the same damaged folder and converted: the other one replaced it first. This
    one leaves the winner's folder as it is (a third start may be reading it) and drops its own copy."""
    import model.openvino

    settings, folder = damaged_cache(tiny_openvino[0], tmp_path, "a missing .bin")
    (converted,) = tiny_openvino[0].openvino_cache_dir.iterdir()
    convert, winner = model.openvino.convert_towers, {}

    def convert_while_another_start_replaces(clip, normaliser):
        models = convert(clip, normaliser)
        os.rename(folder, tmp_path / "aside")  # what the winner did, in its order
        shutil.copytree(converted, tmp_path / "winner's")
        os.rename(tmp_path / "winner's", folder)
        shutil.rmtree(tmp_path / "aside")
        winner["inode"] = folder.stat().st_ino
        return models

    monkeypatch.setattr(model.openvino, "convert_towers", convert_while_another_start_replaces)
    with caplog.at_level("WARNING", logger="model.openvino"):
        loser = create_engine(settings)
    assert folder.stat().st_ino == winner["inode"]
    assert list(folder.parent.iterdir()) == [folder]  # its own copy removed
    assert "not cached" not in caplog.text
    assert_same_answers(engine, loser, [face_image(7)])


def test_a_save_removes_the_folders_of_saves_that_did_not_finish(engine, tiny_openvino, tmp_path):
    """A save killed before its rename leaves its partial folder (or a damaged folder it set aside). The
    next save removes those whose process is gone, and any untouched for many minutes; it keeps those of
    saves that may still be running, and any folder not named as a save names its own."""
    settings, _ = tiny_openvino
    key = next(settings.openvino_cache_dir.iterdir()).name
    finished = subprocess.Popen([sys.executable, "-c", ""])
    finished.wait()  # a process id no process has now
    cache = tmp_path / "cache"
    ages = {
        f".{key}-{finished.pid}-1": 120,  # its process killed mid-save
        f".{key}-{finished.pid}-2-damaged": 120,  # set aside, then killed before removing it
        f".{key}-{os.getpid()}-3": 1200,  # its process id a running process's (taken again since)
        f".{'0' * 24}-{os.getpid()}-4": 0,  # another thread saving now
        f".{key}-{finished.pid}-5": 0,  # a process of another machine saving now (a shared volume)
        ".backup-2024-01": 1200,  # not a save's
    }
    for name, age in ages.items():
        (cache / name).mkdir(parents=True)
        (cache / name / "image.bin").write_bytes(b"part of the weights")
        for path in (cache / name / "image.bin", cache / name):
            os.utime(path, (time.time() - age,) * 2)
    create_engine(settings.model_copy(update={"openvino_cache": cache}))  # converts and saves
    kept = [f".{'0' * 24}-{os.getpid()}-4", f".{key}-{finished.pid}-5", ".backup-2024-01", key]
    assert sorted(path.name for path in cache.iterdir()) == sorted(kept)
    assert sorted(path.name for path in (cache / key).iterdir()) == SAVED


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
