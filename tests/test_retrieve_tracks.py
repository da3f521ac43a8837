"""/retrieve and `fer retrieve` on clips of people (model.faces.synthetic, through the RetinaFace
detector and the tiny random CLIP): a clip with one person answers as it did when each sampled frame was
replaced by its largest face."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from model.faces.synthetic import Walk, people_clip
from model.media import read_video
from model.options import PipelineOptions
from model.pipeline import crops, pool
from service.app import create_app
from tests.support import encode_images, service_settings, wait_ready

DESCRIPTIONS = ["smiles", "frowns deeply", "raises the brows", "looks away", "opens the mouth wide"]
FRAMES = 8


@pytest.fixture(scope="module")
def people_client(engine):
    """The service with the detector that finds the pasted people (test_tracks.py's)."""
    app = create_app(service_settings(face_detector="retinaface"), engine_factory=lambda s: engine)
    with TestClient(app) as client:
        wait_ready(client)
        yield client


def retrieve(client, path, **fields) -> dict:
    form = {"descriptions": json.dumps(DESCRIPTIONS), "frames": str(FRAMES)} | fields
    answer = client.post("/retrieve", files={"file": (path.name, path.read_bytes(), "video/mp4")}, data=form)
    assert answer.status_code == 200, answer.text
    return answer.json()


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
