"""`fer predict`, `fer predict-video`, `fer retrieve` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cli.main import main
from model.pipeline import classify, pool
from model.prompts import BASIC7
from tests.support import encode_images, face_image, make_video


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def test_predict_matches_engine_and_keeps_going_past_bad_files(model_env, engine, tmp_path, capsys):
    good = [tmp_path / "a.png", tmp_path / "b.jpg"]
    face_image(1).save(good[0])
    face_image(2).save(good[1], quality=95)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good[0].read_bytes()[:200])
    files = [
        good[0],
        tmp_path / "empty.png",
        tmp_path / "text.jpg",
        good[1],
        truncated,
        tmp_path / "missing.png",
    ]

    code, rows, err = run_cli(capsys, "predict", "--prompts", "P-2", *map(str, files))

    assert code == 1
    assert [r["file"] for r in rows] == [str(p) for p in good]
    for name in ("empty.png", "text.jpg", "cut.png", "missing.png"):
        assert sum(name in line for line in err.splitlines()) == 1
    from model.media import decode_image

    features = encode_images(engine, [decode_image(p.read_bytes()) for p in good])
    expected = classify(features, engine.class_features(BASIC7, "P-2"), BASIC7)
    for row, result in enumerate(rows):
        assert list(result["probabilities"]) == list(BASIC7)
        assert result["label"] == expected.label(row)
        assert result["probabilities"] == pytest.approx(expected.as_dict(row), abs=1e-6)


def test_predict_with_own_classes(model_env, tmp_path, capsys):
    face_image(3).save(tmp_path / "a.png")
    code, rows, _ = run_cli(capsys, "predict", "--classes", "calm,furious, amused", str(tmp_path / "a.png"))
    assert code == 0 and list(rows[0]["probabilities"]) == ["calm", "furious", "amused"]
    assert sum(rows[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["predict", "--prompts", "P-7", "IMAGE"],
            "unknown prompt set 'P-7': choose one of P-1, P-2, P-3, P-4, P-5",
        ),
        (["predict", "--classes", ",", "IMAGE"], "the class list is empty"),
        (["predict", "--classes", "raf_db", "IMAGE"], "needs at least two classes; did you mean raf-db?"),
        (["predict", "--classes", "calm", "IMAGE"], "needs at least two classes; give a preset"),
        (["predict-video", "--frames", "0", "VIDEO"], "--frames 0: sample between 1 and 512 frames"),
        (["retrieve", "VIDEO", "--descriptions", "TEXT", "--top-k", "0"], "--top-k 0: give 1 or more"),
    ],
)
def test_a_mistaken_option_is_a_one_line_error_with_exit_code_2(model_env, tmp_path, capsys, argv, message):
    face_image(3).save(tmp_path / "a.png")
    (tmp_path / "d.txt").write_text("smiles\n")
    paths = {
        "IMAGE": tmp_path / "a.png",
        "VIDEO": make_video(tmp_path / "c.mp4", 10),
        "TEXT": tmp_path / "d.txt",
    }
    assert main([str(paths.get(a, a)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("fer: error: "), err


def test_a_file_of_the_other_kind_says_which_command_takes_it(model_env, tmp_path, capsys):
    clip = make_video(tmp_path / "c.mp4", 10)
    code, rows, err = run_cli(capsys, "predict", str(clip))
    assert code == 1 and rows == []
    assert f"fer: {clip}: the file is a video, not an image: use `fer predict-video`" in err


def test_predict_video_and_zero_frame_files(model_env, engine, tmp_path, capsys):
    clip = make_video(tmp_path / "c.mp4", 30)
    (tmp_path / "zero.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    code, rows, err = run_cli(capsys, "predict-video", "--frames", "8", str(clip), str(tmp_path / "zero.mp4"))
    assert code == 1 and len(rows) == 1 and "zero.mp4" in err
    from model.media import read_video

    pooled = pool(encode_images(engine, read_video(str(clip), 8).frames)).unsqueeze(0)
    expected = classify(pooled, engine.class_features(BASIC7, "P-3"), BASIC7)
    assert rows[0]["probabilities"] == pytest.approx(expected.as_dict(0), abs=1e-6)


def test_a_clip_s_frames_are_searched_on_threads_of_their_own(model_env, tmp_path, capsys, monkeypatch):
    """Files are prepared one at a time, so a clip's frames are searched several at once, as the
    service's decode threads search them."""
    from model.faces import factory
    from tests.support import ThreadRecordingDetector

    detector = ThreadRecordingDetector()
    monkeypatch.setattr(factory, "create_detector", lambda *args: detector)
    clip = make_video(tmp_path / "c.mp4", 30)
    (tmp_path / "d.txt").write_text("smiles\n")
    assert run_cli(capsys, "predict-video", "--frames", "8", str(clip))[0] == 0
    assert (
        run_cli(capsys, "retrieve", str(clip), "--frames", "8", "--descriptions", str(tmp_path / "d.txt"))[0]
        == 0
    )
    assert len(detector.threads) == 16
    assert all(name.startswith("fer-frames") for name in detector.threads), detector.threads


def test_retrieve_ranks_every_description(model_env, tmp_path, capsys):
    clip = make_video(tmp_path / "c.webm", 20, codec="libvpx-vp9")
    descriptions = tmp_path / "d.txt"
    descriptions.write_text("smiles\n\nfrowns deeply\nraises eyebrows\n")
    code, rows, _ = run_cli(
        capsys, "retrieve", str(clip), "--descriptions", str(descriptions), "--top-k", "2"
    )
    ranking = rows[0]["ranking"]
    assert code == 0 and len(ranking) == 2
    assert ranking[0]["score"] >= ranking[1]["score"]
    assert {r["text"] for r in ranking} <= {"smiles", "frowns deeply", "raises eyebrows"}


def test_retrieve_per_frame_prints_the_service_answer(model_env, client, tmp_path, capsys):
    clip = make_video(tmp_path / "c.mp4", 30)
    texts = ["smiles", "frowns deeply", "raises eyebrows"]
    (tmp_path / "d.txt").write_text("\n".join(texts))
    argv = ["retrieve", str(clip), "--descriptions", str(tmp_path / "d.txt"), "--no-detect-faces"]
    code, rows, _ = run_cli(capsys, *argv, "--frames", "6", "--per-frame")
    served = client.post(
        "/retrieve",
        files={"file": ("c.mp4", clip.read_bytes(), "video/mp4")},
        data={"descriptions": json.dumps(texts), "frames": "6", "per_frame": "true", "detect_faces": "false"},
    ).json()
    printed = rows[0]
    assert code == 0 and printed["media"] == served["media"] == "video"
    assert [r["index"] for r in printed["ranking"]] == [r["index"] for r in served["ranking"]]
    assert len(printed["timeline"]) == 6
    for mine, theirs in zip(printed["timeline"], served["timeline"], strict=True):
        assert set(mine) == set(theirs) == {"index", "timestamp", "scores"}
        assert (mine["index"], mine["timestamp"]) == (theirs["index"], theirs["timestamp"])
        assert mine["scores"] == pytest.approx(theirs["scores"], abs=1e-5)
    assert run_cli(capsys, *argv)[1][0]["timeline"] is None  # only when asked for


def test_cli_on_shared_data(model_env, capsys, shared_data):
    images = sorted((shared_data / "ferplus_valid" / "images").glob("*.png"))[:4]
    code, rows, _ = run_cli(capsys, "predict", "--classes", "ferplus", *map(str, images))
    assert code == 0 and len(rows) == 4 and all(len(r["probabilities"]) == 8 for r in rows)
    clips = sorted((shared_data / "mafw_samples" / "clips").glob("*.gif"))[:2]
    code, rows, _ = run_cli(capsys, "predict-video", "--classes", "mafw", *map(str, clips))
    assert code == 0 and len(rows) == 2 and all(len(r["probabilities"]) == 11 for r in rows)


@pytest.mark.slow
def test_full_size_vit_b32_by_path_in_a_subprocess(tmp_path, full_size_checkpoint):
    """A random-weight ViT-B-32 checkpoint and a random official-format projection, both given by path,
    through the installed console script."""
    clip_path, projection_path = full_size_checkpoint
    face_image(0, size=(224, 224)).save(tmp_path / "face.png")
    make_video(tmp_path / "clip.mp4", 48)
    (tmp_path / "d.txt").write_text("smiles\nfrowns\n")
    env = {
        **os.environ,
        "FER_CLIP_MODEL": "ViT-B-32",
        "FER_CLIP_WEIGHTS": str(clip_path),
        "FER_PROJECTION": str(projection_path),
        "FER_DEVICE": "cpu",
    }
    fer = [sys.executable, "-m", "cli.main"]
    for args in (
        ["predict", str(tmp_path / "face.png")],
        ["predict-video", str(tmp_path / "clip.mp4")],
        ["retrieve", str(tmp_path / "clip.mp4"), "--descriptions", str(tmp_path / "d.txt")],
    ):
        done = subprocess.run(fer + args, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert "probabilities" in result or len(result["ranking"]) == 2
