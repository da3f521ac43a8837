"""The endpoints' answers through the real ASGI app (lifespan included) on the tiny random CLIP:
readiness, /predict, /predict-video, /retrieve, /labels, /metrics and the docs, and which threads do
the work."""

from __future__ import annotations

import json
import re
import threading

import anyio.to_thread
import pytest
import torch
from fastapi.testclient import TestClient

from model.media import decode_image, read_video
from model.options import PipelineOptions
from model.pipeline import classify, pool, prepare_video
from model.prompts import BASIC7
from model.registry import MissingWeights
from service.app import create_app
from tests.support import (
    ThreadRecordingDetector,
    encode_images,
    face_image,
    jpeg,
    make_video,
    png,
    post_image,
    service_settings,
    two_faces,
    wait_ready,
    wait_until,
)


def scores(engine, features, classes, prompt_set):
    return classify(features, engine.class_features(classes, prompt_set), classes)


# ---- readiness ----------------------------------------------------------------------------------
def test_readiness_flips_after_warm_up(engine):
    release = threading.Event()

    def slow_factory(_):
        release.wait(10)
        return engine

    app = create_app(service_settings(), engine_factory=slow_factory)
    with TestClient(app) as client:
        assert client.get("/livez").status_code == 200
        assert client.get("/readyz").status_code == 503
        refused = post_image(client, png(face_image(0)))
        assert refused.status_code == 503 and refused.json()["error"] == "not_ready"
        release.set()
        wait_ready(client)
        assert client.get("/readyz").json() == {
            "status": "ready",
            "model": "custom",
            "model_warning": None,
            "device": "cpu",
            "dtype": "float32",
            "face_detector": "haar",
            "detail": None,
        }
        assert post_image(client, png(face_image(0))).status_code == 200


def test_only_the_device_thread_runs_torch_on_several_threads(engine):
    """Every thread that runs torch in parallel keeps an OpenMP team; more teams than cores make every
    op of an encoder call slower, so decoding runs torch on one thread and the encoder on the CPUs
    given to it. Building and serving an app changes no process-wide setting of the caller's."""
    default = torch.get_num_threads()
    app = create_app(service_settings(device_threads=3, decode_workers=2), engine_factory=lambda s: engine)
    with TestClient(app) as client:
        wait_ready(client)
        runtime = app.state.runtime
        assert client.portal.call(runtime.batcher.run, torch.get_num_threads) == 3  # the device thread
        assert client.portal.call(runtime.offload, torch.get_num_threads) == 1  # a decode thread
    assert torch.get_num_threads() == default


def test_inference_requests_take_no_hop_through_the_generic_thread_pool(client, monkeypatch, tmp_path):
    """Starlette runs plain `def` dependencies and endpoints in anyio's thread pool: a thread hop per
    request on the event loop's critical path. Decode and scoring have their own pool (Runtime.offload)."""
    hops = []
    real = anyio.to_thread.run_sync

    async def counting(func, *args, **kwargs):
        hops.append(getattr(func, "__name__", repr(func)))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    clip = make_video(tmp_path / "c.mp4", 20).read_bytes()
    for path, data in (
        ("/predict", {"detect_faces": "false"}),
        ("/predict-video", {"frames": "4"}),
        ("/retrieve", {"descriptions": json.dumps(["smiles", "frowns"])}),
    ):
        upload = (
            ("c.png", png(face_image()), "image/png") if path == "/predict" else ("c.mp4", clip, "video/mp4")
        )
        assert client.post(path, files={"file": upload}, data=data).status_code == 200, path
    assert hops == []


def test_a_failed_load_is_reported_by_readyz(engine):
    def missing(_):
        raise MissingWeights("CLIP weights are not in weights/: run `fer weights download exp-clip-b32`")

    with TestClient(create_app(service_settings(), engine_factory=missing)) as client:
        # The load runs in the background: wait for its outcome, not a fixed time.
        wait_until(lambda: client.get("/readyz").json()["detail"] != "loading", "the load's outcome")
        answer = client.get("/readyz")
        assert answer.status_code == 503 and "fer weights download" in answer.json()["detail"]
        assert client.get("/livez").status_code == 200


# ---- /predict -------------------------------------------------------------------------------------
def test_predict_reports_every_face_largest_first(client):
    data, expected = two_faces()
    answer = client.post("/predict", files={"file": ("two.png", data, "image/png")})
    assert answer.status_code == 200
    body = answer.json()
    assert body["face_detected"] and len(body["faces"]) == 2
    for face, (x, y, side) in zip(body["faces"], expected, strict=True):
        bx, by, bw, bh = face["box"]
        assert bw == bh  # the cascade reports square boxes
        assert abs(bx - x) < 20 and abs(by - y) < 20 and abs(bw - side) < 25
        assert sum(face["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert body["probabilities"] == body["faces"][0]["probabilities"]
    assert body["label"] == body["faces"][0]["label"]
    assert set(body["timing"]) == {"decode_ms", "queue_ms", "inference_ms", "total_ms"}
    assert body["model"] == "custom"


def test_predict_equals_the_engine(client, engine, tmp_path):
    image = face_image(5, size=(150, 120))
    path = tmp_path / "face.png"
    image.save(path)
    answer = post_image(client, path.read_bytes(), detect_faces="false", prompts="P-4", classes="basic8")
    body = answer.json()
    assert body["face_detected"] is False and body["faces"] == [] and body["note"] is None
    expected = scores(
        engine, encode_images(engine, [decode_image(path.read_bytes())]), tuple(body["classes"]), "P-4"
    )
    assert body["probabilities"] == pytest.approx(expected.as_dict(0), abs=1e-6)


def test_the_default_detector_reports_landmarks_and_scores(engine):
    app = create_app(service_settings(face_detector="retinaface"), engine_factory=lambda s: engine)
    with TestClient(app) as client:
        wait_ready(client)
        assert client.get("/readyz").json()["face_detector"] == "retinaface-mnet0.25"
        data, expected = two_faces()
        body = client.post("/predict", files={"file": ("two.png", data, "image/png")}).json()
    assert len(body["faces"]) == 2
    for face, (x, y, side) in zip(body["faces"], expected, strict=True):
        bx, by, bw, bh = face["box"]
        assert abs(bx + bw / 2 - (x + side / 2)) < side / 3 and abs(by + bh / 2 - (y + side / 2)) < side / 3
        assert 0.7 <= face["score"] <= 1
        assert len(face["landmarks"]) == 5
        assert all(bx <= px <= bx + bw and by <= py <= by + bh for px, py in face["landmarks"])


def test_detection_can_be_turned_off_for_the_whole_service(engine):
    app = create_app(service_settings(face_detector="none"), engine_factory=lambda s: engine)
    with TestClient(app) as client:
        wait_ready(client)
        assert client.get("/readyz").json()["face_detector"] == "none"
        body = client.post("/predict", files={"file": ("two.png", two_faces()[0], "image/png")}).json()
    assert body["faces"] == [] and body["face_detected"] is False and body["note"] is None


def test_no_face_classifies_the_whole_image_and_says_so(client):
    body = post_image(client, png(face_image(1)), classes="calm,angry").json()
    assert body["face_detected"] is False and "no face" in body["note"]
    assert list(body["probabilities"]) == ["calm", "angry"]


def test_the_answer_s_queue_wait_is_the_batcher_s_own_measurement(client):
    """`timing` splits the request into its stages; the queue wait is the one the batcher measured (its
    /metrics histogram), not a guess from the outside."""
    from prometheus_client.parser import text_string_to_metric_families

    def waited_s() -> float:
        families = text_string_to_metric_families(client.get("/metrics").text)
        return sum(s.value for f in families for s in f.samples if s.name == "fer_queue_wait_seconds_sum")

    before = waited_s()
    timing = post_image(client, png(face_image(0)), detect_faces="false").json()["timing"]
    assert timing["queue_ms"] == pytest.approx((waited_s() - before) * 1000, abs=0.01)
    parts = timing["decode_ms"] + timing["queue_ms"] + timing["inference_ms"]
    assert parts == pytest.approx(timing["total_ms"], abs=0.03)


# ---- /predict-video and /retrieve ----------------------------------------------------------------
def test_predict_video_with_timeline_equals_the_engine(client, engine, tmp_path):
    clip = make_video(tmp_path / "c.mp4", 40).read_bytes()
    answer = client.post(
        "/predict-video",
        files={"file": ("c.mp4", clip, "video/mp4")},
        data={"frames": "8", "per_frame": "true", "detect_faces": "false", "prompts": "P-2"},
    )
    body = answer.json()
    assert answer.status_code == 200 and body["frames_sampled"] == 8 and body["n_frames"] == 40
    assert [f["index"] for f in body["timeline"]] == [2, 7, 12, 17, 22, 27, 32, 37]
    assert body["timeline"][1]["timestamp"] == pytest.approx(7 / 25, abs=0.01)
    frames = read_video(clip, 8).frames
    expected = scores(engine, pool(encode_images(engine, frames)).unsqueeze(0), BASIC7, "P-2")
    assert body["probabilities"] == pytest.approx(expected.as_dict(0), abs=1e-6)
    per_frame = scores(engine, encode_images(engine, frames), BASIC7, "P-2")
    assert body["timeline"][3]["probabilities"] == pytest.approx(per_frame.as_dict(3), abs=1e-6)


def test_a_prepared_video_does_not_keep_its_decoded_frames(engine, tmp_path):
    """Only the encoder's uint8 pixels wait in the queue, not the decoded PIL frames beside them."""
    with (make_video(tmp_path / "c.mp4", 40)).open("rb") as f:
        prepared = prepare_video(f, engine.prepare_many, None, PipelineOptions(detect_faces=False, frames=8))
    assert prepared.pixels.shape[0] == 8 and len(prepared.clip.indices) == 8
    assert prepared.clip.frames == []


def test_a_clip_s_frames_are_searched_on_the_decode_threads(engine, tmp_path):
    """A clip decodes on a video thread, which hands its frames' face searches to the decode threads: one
    clip uses every core, and searches never outnumber the decode threads. A still image sent to
    /retrieve is searched on the decode thread that prepares it: with one decode thread, handing it on
    would wait forever."""
    detector = ThreadRecordingDetector()
    app = create_app(service_settings(decode_workers=1), engine_factory=lambda s: engine)
    clip = make_video(tmp_path / "c.mp4", 40).read_bytes()
    descriptions = {"descriptions": json.dumps(["smiles", "frowns"])}
    with TestClient(app) as client:
        wait_ready(client)
        app.state.runtime.detector = detector
        video = {"file": ("c.mp4", clip, "video/mp4")}
        assert client.post("/predict-video", files=video, data={"frames": "8"}).status_code == 200
        assert client.post("/retrieve", files=video, data={"frames": "8"} | descriptions).status_code == 200
        still = {"file": ("f.png", png(face_image(2)), "image/png")}
        assert client.post("/retrieve", files=still, data=descriptions).status_code == 200
    assert len(detector.threads) == 8 + 8 + 1
    assert all(name.startswith("fer-decode") for name in detector.threads), detector.threads


def test_retrieve_ranks_descriptions_for_videos_and_images(client, tmp_path):
    clip = make_video(tmp_path / "c.webm", 20, codec="libvpx-vp9").read_bytes()
    descriptions = ["smiles", "frowns deeply", "raises the brows", "looks away"]
    for name, data, media_type, media in (
        ("c.webm", clip, "video/webm", "video"),
        ("f.jpg", jpeg(face_image(2)), "image/jpeg", "image"),
        ("f.jpg", jpeg(face_image(2)), "application/octet-stream", "image"),
    ):
        answer = client.post(
            "/retrieve",
            files={"file": (name, data, media_type)},
            data={"descriptions": json.dumps(descriptions), "top_k": "3"},
        )
        body = answer.json()
        assert answer.status_code == 200 and body["media"] == media
        scores = [r["score"] for r in body["ranking"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert all(descriptions[r["index"]] == r["text"] for r in body["ranking"])


def test_text_is_encoded_on_the_device_thread(client, engine, monkeypatch):
    """A new class list and /retrieve's descriptions are encoded on the device thread, with every
    intra-op thread and in turn with image batches; scoring in the pool gets the features handed over."""
    threads = []
    encode_texts = engine.encode_texts

    def recording(texts):
        threads.append(threading.current_thread().name)
        return encode_texts(texts)

    monkeypatch.setattr(engine, "encode_texts", recording)
    image = png(face_image(3))
    assert post_image(client, image, classes="calm,tense,bored", detect_faces="false").status_code == 200
    assert post_image(client, image, classes="calm,tense,bored", detect_faces="false").status_code == 200
    answer = client.post(
        "/retrieve",
        files={"file": ("f.png", image, "image/png")},
        data={"descriptions": json.dumps(["smiles", "frowns"]), "detect_faces": "false"},
    )
    assert answer.status_code == 200
    assert len(threads) == 2 and all(name.startswith("fer-device") for name in threads), threads


# ---- labels, metrics, docs ----------------------------------------------------------------------------
def test_labels_metrics_and_docs(client):
    labels = client.get("/labels").json()
    assert labels["class_presets"]["ferplus"][-1] == "contempt" and len(labels["prompt_sets"]["P-5"]) == 10
    official = labels["official_prompts"]
    assert official["P-4"]["sadness"][1] == "a cropped photo emphasizing a face expressing sadness."
    assert set(official["P-4"]) == {"sadness"} and len(official["P-5"]) == 11 and official["P-3"] == {}
    post_image(client, png(face_image(0)))
    post_image(client, b"junk")
    text = client.get("/metrics").text
    assert 'fer_requests_total{endpoint="/predict",status="200"}' in text
    assert 'fer_requests_total{endpoint="/predict",status="400"}' in text
    for name in (
        "fer_batch_size_count",
        "fer_queue_depth",
        "fer_queue_wait_seconds_count",
        "fer_model_seconds_sum",
    ):
        assert name in text
    schema = client.get("/openapi.json").json()
    assert {"PredictResponse", "VideoResponse", "RetrieveResponse"} <= set(schema["components"]["schemas"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text
    assert re.findall(r"https?://[^\s\"']+", docs.text) == []  # no CDN
    assert client.get("/nope").json()["error"] == "not_found"
