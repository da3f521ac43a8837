"""Every message a stranger meets on a first try is one sentence of the project's own: no cut-off media
types, no `[Errno 2]`, no pydantic prefixes, no library warnings; the service's through the real app,
the command line's through `fer` itself."""

from __future__ import annotations

import json
import warnings

import pytest

from cli.main import main
from tests.support import face_image, make_video, png


def detail(answer) -> str:
    return answer.json()["detail"]


@pytest.mark.parametrize(
    ("path", "fields", "accepted"),
    [
        ("/predict", {}, "send an image (image/*)"),
        ("/predict-video", {}, "send a video (video/*) or an animated GIF (image/gif)"),
        ("/retrieve", {"descriptions": '["smiles"]'}, "send a video (video/*) or an image (image/*)"),
    ],
)
def test_an_unsupported_type_names_what_is_accepted_in_words(demo_client, path, fields, accepted):
    answer = demo_client.post(path, files={"file": ("a.txt", b"hello", "text/plain")}, data=fields)
    assert answer.status_code == 415
    assert detail(answer) == f"text/plain is not accepted here: {accepted}"


def test_a_get_on_an_upload_endpoint_names_post(demo_client):
    answer = demo_client.get("/predict")
    assert answer.status_code == 405
    assert detail(answer) == "GET is not accepted here: /predict takes POST"


RETRIEVE = {"descriptions": '["smiles"]'}


@pytest.mark.parametrize(
    ("path", "fields", "field", "value", "message"),
    [
        ("/predict-video", {}, "detect_faces", "maybe", "detect_faces: give true or false"),
        ("/predict-video", {}, "per_frame", "often", "per_frame: give true or false"),
        ("/predict-video", {}, "frames", "many", "frames: give a whole number"),
        # the schema's boolean is true or false: pydantic's other spellings (found by schemathesis)
        ("/predict-video", {}, "detect_faces", "0", "detect_faces: give true or false"),
        ("/predict-video", {}, "per_frame", "yes", "per_frame: give true or false"),
        ("/predict-video", {}, "check_words", "on", "check_words: give true or false"),
        ("/retrieve", RETRIEVE, "per_frame", "yes", "per_frame: give true or false"),
        ("/retrieve", RETRIEVE, "per_frame", "1", "per_frame: give true or false"),
        ("/retrieve", RETRIEVE, "per_frame", "on", "per_frame: give true or false"),
        ("/retrieve", RETRIEVE, "detect_faces", "0", "detect_faces: give true or false"),
    ],
)
def test_a_field_of_the_wrong_kind_says_what_kind(demo_client, tmp_path, path, fields, field, value, message):
    clip = make_video(tmp_path / "c.mp4", 10).read_bytes()
    files = {"file": ("c.mp4", clip, "video/mp4")}
    answer = demo_client.post(path, files=files, data={**fields, field: value})
    assert answer.status_code == 422
    assert detail(answer) == message


@pytest.mark.parametrize(
    ("fields", "files", "message"),
    [
        (
            {},
            {"file": ("a.png", b"x", "image/png")},
            'descriptions: the field is required: a JSON array of non-blank strings, e.g. ["smiles", "frowns"]',
        ),
        ({"descriptions": '["smiles"]'}, None, "file: the field is required: a video (or an image)"),
    ],
)
def test_a_missing_field_says_what_it_takes(demo_client, fields, files, message):
    answer = demo_client.post("/retrieve", data=fields, files=files)
    assert answer.status_code == 422
    assert detail(answer) == message


@pytest.mark.parametrize(("path", "fields"), [("/predict-video", {}), ("/retrieve", RETRIEVE)])
def test_a_boolean_is_true_or_false_in_any_case(demo_client, tmp_path, path, fields):
    """`True`: what a generated Python client sends (str(True))."""
    clip = make_video(tmp_path / "c.mp4", 10).read_bytes()
    for value in ("true", "True", "FALSE"):
        answer = demo_client.post(
            path,
            files={"file": ("c.mp4", clip, "video/mp4")},
            data={**fields, "per_frame": value, "frames": 2},
        )
        assert answer.status_code == 200, answer.text
        assert (answer.json()["timeline"] is not None) == (value.lower() == "true")


def test_a_still_image_without_its_type_sent_for_a_video_says_where_it_belongs(demo_client):
    files = {"file": ("a.bin", png(face_image(0)), "application/octet-stream")}
    answer = demo_client.post("/predict-video", files=files)
    assert answer.status_code == 400
    assert detail(answer) == "the file is a still image, not a video: send it to POST /predict"


# ---- the command line ---------------------------------------------------------------------------
def test_predict_video_on_a_photo_says_use_fer_predict(model_env, tmp_path, capsys):
    face_image(0).save(tmp_path / "face.jpg")
    assert main(["predict-video", str(tmp_path / "face.jpg")]) == 1
    err = capsys.readouterr().err
    assert err == f"fer: {tmp_path / 'face.jpg'}: the file is a still image, not a video: use `fer predict`\n"


def test_retrieve_with_a_missing_descriptions_file_says_so_in_words(model_env, tmp_path, capsys):
    clip = make_video(tmp_path / "c.mp4", 10)
    missing = tmp_path / "nope.txt"
    assert main(["retrieve", str(clip), "--descriptions", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"fer: error: --descriptions {missing}: no such file\n"


def test_a_bad_preset_is_one_sentence_without_pydantics_prefix(monkeypatch, capsys):
    monkeypatch.setenv("FER_PRESET", "nope")
    assert main(["predict", "face.jpg"]) == 2
    err = capsys.readouterr().err
    assert "Value error" not in err
    assert err.startswith("fer: error: invalid FER_* configuration: FER_PRESET: unknown preset 'nope': ")


def test_eval_reports_skipped_files_in_words_and_draws_without_warnings(model_env, tmp_path, capsys):
    face_image(0).save(tmp_path / "a.png")
    face_image(1).save(tmp_path / "b.png")
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\na.png,happiness\nb.png,sadness\nmissing.png,anger\n")
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's layout warning, or any other, fails the test
        assert main(["eval", "--data", str(labels), "--out", str(out), "--prompts", "P-3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    (skipped,) = [m["skipped"] for m in metrics["models"].values()]
    assert list(skipped.values()) == ["no such file"]
    assert "Errno" not in capsys.readouterr().err
