"""/retrieve and `fer retrieve` on clips of people (model.faces.synthetic, through the RetinaFace
detector and the tiny random CLIP): each person's track ranks the descriptions and scores them at each of
its frames, on the very tracks /predict-video gives; a clip with one person answers as it did when each
sampled frame was replaced by its largest face."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from model.faces.synthetic import Walk, people_clip
from model.media import read_video
from model.options import PipelineOptions
from model.pipeline import crops, encode_in_batches, face_tracks, frame_boxes, pool, prepare_video
from service.admission import Places
from service.app import create_app
from tests.support import (
    encode_images,
    make_video,
    people_walks,
    service_settings,
    two_faces,
    wait_ready,
)

DESCRIPTIONS = ["smiles", "frowns deeply", "raises the brows", "looks away", "opens the mouth wide"]
FRAMES = 8
MAX_FACES = 4


@pytest.fixture(scope="module")
def people_client(engine):
    """The service with the detector that finds the pasted people (test_tracks.py's)."""
    app = create_app(
        service_settings(face_detector="retinaface", max_faces=MAX_FACES), engine_factory=lambda s: engine
    )
    with TestClient(app) as client:
        wait_ready(client)
        yield client


def retrieve(client, path, media_type: str = "video/mp4", **fields) -> dict:
    form = {"descriptions": json.dumps(DESCRIPTIONS), "frames": str(FRAMES)} | fields
    answer = client.post("/retrieve", files={"file": (path.name, path.read_bytes(), media_type)}, data=form)
    assert answer.status_code == 200, answer.text
    return answer.json()


def track_frames(track: dict) -> list[tuple]:
    return [(f["index"], f["timestamp"], f["box"]) for f in track["frames"]]


@pytest.fixture(scope="module")
def two_people(person, tmp_path_factory):
    return people_clip(tmp_path_factory.mktemp("people") / "two.mp4", people_walks("sizes swap", person))


def test_each_person_ranks_and_scores_the_descriptions_on_predict_video_s_tracks(
    people_client, engine, detector, two_people, monkeypatch
):
    admission, batcher = people_client.app.state.runtime.admission, people_client.app.state.runtime.batcher
    asked, held = [], []
    reserve, submit = admission.reserve, batcher.submit
    monkeypatch.setattr(admission, "reserve", lambda **places: asked.append(places) or reserve(**places))
    monkeypatch.setattr(batcher, "submit", lambda *a, **k: held.append(admission.depth) or submit(*a, **k))
    body = retrieve(people_client, two_people.path, per_frame="true", top_k="2")
    # admitted as /predict-video is (a place a frame, then the faces found), and the descriptions to encode
    assert asked == [
        {
            "images": 0,
            "frames": FRAMES,
            "texts": len(DESCRIPTIONS),
            "shared_texts": 0,
            "most": Places(frames=FRAMES * MAX_FACES),
        }
    ]
    assert held == [FRAMES * 2 + len(DESCRIPTIONS)]  # two people in each frame
    video = people_client.post(
        "/predict-video",
        files={"file": ("two.mp4", two_people.path.read_bytes(), "video/mp4")},
        data={"frames": str(FRAMES)},
    ).json()
    assert len(body["tracks"]) == len(video["tracks"]) == 2
    for mine, theirs in zip(body["tracks"], video["tracks"], strict=True):
        assert mine["id"] == theirs["id"] and track_frames(mine) == track_frames(theirs)

    # Each track's numbers: its faces' features, as the pipeline links them, scored here.
    with open(two_people.path, "rb") as source:
        prepared = prepare_video(source, engine.prepare_many, detector, PipelineOptions(frames=FRAMES))
    features = encode_in_batches(engine.encode_pixels, prepared.pixels, 64)
    tracks = face_tracks(frame_boxes(prepared), features)
    text = engine.encode_texts(DESCRIPTIONS)
    for answered, track in zip(body["tracks"], tracks, strict=True):
        pooled = text @ pool(features[track.rows])
        assert [r["index"] for r in answered["ranking"]] == torch.argsort(pooled, descending=True)[
            :2
        ].tolist()
        for ranked in answered["ranking"]:
            assert ranked["score"] == pytest.approx(float(pooled[ranked["index"]]), abs=1e-5)
        expected = F.normalize(features[track.rows], dim=-1) @ text.T
        got = torch.tensor([f["scores"] for f in answered["frames"]])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    first, second = (torch.tensor([f["scores"] for f in t["frames"]]) for t in body["tracks"])
    assert not torch.allclose(first.mean(0), second.mean(0), atol=1e-3)  # two people, two answers

    # the clip's answer is the main track's
    main = body["tracks"][0]
    assert body["ranking"] == main["ranking"]
    assert [(f["index"], f["timestamp"], f["scores"]) for f in body["timeline"]] == [
        (f["index"], f["timestamp"], f["scores"]) for f in main["frames"]
    ]

    plain = retrieve(people_client, two_people.path, top_k="2")
    assert plain["timeline"] is None and plain["ranking"] == body["ranking"]
    for mine, full in zip(plain["tracks"], body["tracks"], strict=True):
        assert mine["ranking"] == full["ranking"] and track_frames(mine) == track_frames(full)
        assert all(f["scores"] is None for f in mine["frames"])


def test_a_still_image_is_one_frame_of_its_largest_face(people_client, tmp_path):
    image = tmp_path / "two.png"
    image.write_bytes(two_faces()[0])
    body = retrieve(people_client, image, "image/png", per_frame="true")
    faces = people_client.post("/predict", files={"file": ("two.png", image.read_bytes(), "image/png")})
    largest = faces.json()["faces"][0]["box"]
    assert body["media"] == "image"
    (track,) = body["tracks"]
    (frame,) = track["frames"]
    assert (frame["index"], frame["timestamp"], frame["box"]) == (0, 0.0, largest)
    assert track["ranking"] == body["ranking"] and frame["scores"] == body["timeline"][0]["scores"]
    assert retrieve(people_client, image, "image/png", detect_faces="false")["tracks"] == []


def test_without_a_face_the_whole_frames_answer_and_there_is_no_track(people_client, tmp_path):
    clip = make_video(tmp_path / "c.mp4", 40)  # frames that show their index: no face
    found = retrieve(people_client, clip, per_frame="true")
    whole = retrieve(people_client, clip, per_frame="true", detect_faces="false")
    assert found["tracks"] == whole["tracks"] == [] and len(found["timeline"]) == FRAMES
    assert found["ranking"] == whole["ranking"] and found["timeline"] == whole["timeline"]


def test_fer_retrieve_prints_the_same_tracks(model_env, people_client, two_people, tmp_path, capsys):
    from cli.main import main

    (tmp_path / "d.txt").write_text("\n".join(DESCRIPTIONS))
    argv = ["retrieve", str(two_people.path), "--descriptions", str(tmp_path / "d.txt")]
    assert main([*argv, "--frames", str(FRAMES), "--per-frame", "--top-k", "2"]) == 0
    (printed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    served = retrieve(people_client, two_people.path, per_frame="true", top_k="2")
    assert len(printed["tracks"]) == len(served["tracks"]) == 2
    for mine, theirs in zip(printed["tracks"], served["tracks"], strict=True):
        assert mine["id"] == theirs["id"] and track_frames(mine) == track_frames(theirs)
        assert [r["index"] for r in mine["ranking"]] == [r["index"] for r in theirs["ranking"]]
        for a, b in zip(mine["frames"], theirs["frames"], strict=True):
            assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
    assert [f["index"] for f in printed["timeline"]] == [f["index"] for f in printed["tracks"][0]["frames"]]


def test_one_person_answers_as_the_largest_face_of_each_frame(
    people_client, engine, detector, person, tmp_path
):
    """The answer before tracks, computed here without the pipeline's clip stages: each sampled frame's
    largest face cropped, the crops' features pooled for the ranking and scored one by one for the
    timeline."""
    clip = people_clip(tmp_path / "one.mp4", [Walk(person, (0.3, 0.4), (0.6, 0.55), (0.1, 0.14))])
    options = PipelineOptions(frames=FRAMES)
    video = read_video(str(clip.path), FRAMES)
    largest = [
        crops(frame, detector.detect(frame, 1, long_side=options.video_face_side), options)
        for frame in video.frames
    ]
    assert all(len(faces) == 1 for faces in largest)
    features = encode_images(engine, [face for (face,) in largest])
    text = engine.encode_texts(DESCRIPTIONS)
    pooled = text @ pool(features)
    per_frame = F.normalize(features, dim=-1) @ text.T

    body = retrieve(people_client, clip.path, per_frame="true", top_k="3")
    assert [r["index"] for r in body["ranking"]] == torch.argsort(pooled, descending=True)[:3].tolist()
    for ranked in body["ranking"]:
        assert ranked["score"] == pytest.approx(float(pooled[ranked["index"]]), abs=1e-5)
    assert [f["index"] for f in body["timeline"]] == video.indices
    torch.testing.assert_close(
        torch.tensor([f["scores"] for f in body["timeline"]]), per_frame, atol=1e-5, rtol=1e-4
    )
    plain = retrieve(people_client, clip.path, top_k="3")
    assert plain["ranking"] == body["ranking"] and plain["timeline"] is None
