"""The demo preset says what it is: its random weights make every answer meaningless, and /readyz and
every answer say so beside the model's name; a model with real weights says nothing of the kind, and
open_clip's own notice about random weights is not printed (it was asked for)."""

from __future__ import annotations

import json
import logging

from fastapi.testclient import TestClient

from model.registry import RANDOM_WEIGHTS_WARNING
from service.app import create_app
from service.settings import ServiceSettings
from tests.support import face_image, make_video, png, wait_ready


def test_readyz_and_every_answer_carry_the_warning(demo_client, tmp_path):
    assert RANDOM_WEIGHTS_WARNING == "random weights: answers are meaningless"
    ready = demo_client.get("/readyz").json()
    assert ready["model"] == "demo" and ready["model_warning"] == RANDOM_WEIGHTS_WARNING

    photo = {"file": ("a.png", png(face_image(0)), "image/png")}
    clip = {"file": ("c.mp4", make_video(tmp_path / "c.mp4", 10).read_bytes(), "video/mp4")}
    answers = [
        demo_client.post("/predict", files=photo),
        demo_client.post("/predict-video", files=clip),
        demo_client.post("/retrieve", files=clip, data={"descriptions": json.dumps(["smiles"])}),
    ]
    for answer in answers:
        body = answer.json()
        assert answer.status_code == 200, body
        assert body["model"] == "demo" and body["model_warning"] == RANDOM_WEIGHTS_WARNING


def test_a_model_with_real_weights_has_no_warning(engine, tmp_path):
    app = create_app(ServiceSettings(device="cpu", face_detector="none"), engine_factory=lambda s: engine)
    with TestClient(app) as c:
        wait_ready(c)
        assert c.get("/readyz").json()["model_warning"] is None
        answer = c.post("/predict", files={"file": ("a.png", png(face_image(0)), "image/png")})
        assert answer.json()["model_warning"] is None


def test_loading_the_demo_logs_no_random_init_notice(caplog):
    from model.engine import create_engine
    from model.settings import ModelSettings

    with caplog.at_level(logging.WARNING):
        engine = create_engine(ModelSettings(preset="demo", device="cpu"))
    assert engine.warning == RANDOM_WEIGHTS_WARNING
    assert not [r for r in caplog.records if "pretrained" in r.getMessage()], caplog.text
