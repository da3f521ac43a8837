"""/retrieve's per-frame scores (`per_frame=true`): when in a clip each description fits, through the real
ASGI app on the tiny random CLIP."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skimage_data

from model.media import read_video
from tests.support import encode_images, face_image, make_video, png

DESCRIPTIONS = ["smiles", "frowns deeply", "raises the brows", "looks away", "opens the mouth wide"]


def retrieve(client, name: str, data: bytes, media_type: str, **fields) -> dict:
    form = {"descriptions": json.dumps(DESCRIPTIONS), "detect_faces": "false"} | fields
    answer = client.post("/retrieve", files={"file": (name, data, media_type)}, data=form)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_each_frame_scores_every_description_by_its_own_cosine(client, engine, tmp_path):
    clip = make_video(tmp_path / "c.mp4", 40).read_bytes()  # each frame shows its index: all differ
    body = retrieve(client, "c.mp4", clip, "video/mp4", frames="8", per_frame="true", top_k="2")
    frames = encode_images(engine, read_video(clip, 8).frames)
    text = engine.encode_texts(DESCRIPTIONS)
    expected = F.normalize(frames, dim=-1) @ text.T  # [frames, descriptions], in the given order

    timeline = body["timeline"]
    assert len(body["ranking"]) == 2 and len(timeline) == 8  # top_k trims the ranking, not the frames
    got = torch.tensor([f["scores"] for f in timeline])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got[0], got[-1], atol=1e-4)  # different frames, different scores

    # frames named as /predict-video's timeline names them
    video = client.post(
        "/predict-video",
        files={"file": ("c.mp4", clip, "video/mp4")},
        data={"frames": "8", "per_frame": "true", "detect_faces": "false"},
    ).json()
    assert [(f["index"], f["timestamp"]) for f in timeline] == [
        (f["index"], f["timestamp"]) for f in video["timeline"]
    ]

    # the ranking's score is the cosine with the pooled feature (the mean of the frames' features, then
    # L2): the frames' scores weighted by their features' norms, over the norm of their sum
    norms = frames.norm(dim=-1)
    pooled = (norms[:, None] * got).sum(0) / frames.sum(0).norm()
    for ranked in body["ranking"]:
        assert ranked["score"] == pytest.approx(float(pooled[ranked["index"]]), abs=1e-5)


def test_a_description_peaks_where_its_picture_is_shown(client, tmp_path):
    """A clip that shows one picture, then another: the description whose still scores differ most
    between the two pictures scores higher at every frame of the picture it fits better, and peaks
    there."""
    size = 128
    first = Image.fromarray(skimage_data.astronaut()).resize((size, size))
    second = Image.fromarray(skimage_data.coffee()).resize((size, size))

    def draw(i: int, _size: int) -> np.ndarray:
        return np.asarray(first if i < 20 else second)

    clip = make_video(tmp_path / "two.mp4", 40, size=size, draw=draw).read_bytes()
    stills = [
        retrieve(client, "p.png", png(p), "image/png", per_frame="true")["timeline"][0]["scores"]
        for p in (first, second)
    ]
    gap = [a - b for a, b in zip(*stills, strict=True)]
    d = max(range(len(DESCRIPTIONS)), key=lambda i: abs(gap[i]))
    assert abs(gap[d]) > 0.005, f"the pictures score too alike to tell apart: {gap}"
    fits_first = gap[d] > 0

    timeline = retrieve(client, "two.mp4", clip, "video/mp4", per_frame="true")["timeline"]
    shown = {
        True: [f["scores"][d] for f in timeline if f["index"] < 20],
        False: [f["scores"][d] for f in timeline if f["index"] >= 20],
    }
    assert len(shown[True]) == len(shown[False]) == 8
    assert min(shown[fits_first]) > max(shown[not fits_first])
    peak = max(timeline, key=lambda f: f["scores"][d])
    assert (peak["index"] < 20) == fits_first and (peak["timestamp"] < 20 / 25) == fits_first


def test_a_still_image_is_one_frame_whose_scores_are_the_ranking(client):
    body = retrieve(client, "f.png", png(face_image(4)), "image/png", per_frame="true", top_k="3")
    assert body["media"] == "image"
    (frame,) = body["timeline"]
    assert frame["index"] == 0 and frame["timestamp"] == 0.0 and len(frame["scores"]) == len(DESCRIPTIONS)
    for ranked in body["ranking"]:
        assert ranked["score"] == pytest.approx(frame["scores"][ranked["index"]], abs=1e-6)


def test_without_per_frame_the_answer_is_as_before(client, tmp_path):
    clip = make_video(tmp_path / "c.mp4", 20).read_bytes()
    plain = retrieve(client, "c.mp4", clip, "video/mp4", frames="4")
    assert plain["timeline"] is None
    with_frames = retrieve(client, "c.mp4", clip, "video/mp4", frames="4", per_frame="true")
    assert with_frames["ranking"] == plain["ranking"]
