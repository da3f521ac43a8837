"""The REST service through the real ASGI app (lifespan included) on the tiny random CLIP."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import threading
import time
from contextlib import asynccontextmanager

import anyio.to_thread
import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from model.faces.haar import HaarDetector
from model.media import decode_image, read_video
from model.options import PipelineOptions
from model.pipeline import classify, pool, prepare_video
from model.prompts import BASIC7
from model.registry import MissingWeights
from service.app import create_app
from service.limits import UploadLimits
from service.settings import ServiceSettings
from tests.conftest import (
    encode_images,
    face_image,
    fer_serve,
    free_port,
    make_video,
    png,
    run_bounded,
    two_faces,
    wait_ready,
)


class GatedEngine:
    """The real engine, with an encoder that can be held (gate) or made to fail once, and counts of
    the inputs prepared (decoded and resized) and of the encoder's calls."""

    def __init__(self, engine):
        self._engine = engine
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set when an encoder call starts
        self.fail_next = False
        self.calls: list[int] = []
        self.prepared = 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def prepare_many(self, images):
        self.prepared += 1
        return self._engine.prepare_many(images)

    def encode_pixels(self, pixels):
        self.entered.set()
        self.gate.wait(10)
        self.calls.append(pixels.shape[0])
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("simulated device failure")
        return self._engine.encode_pixels(pixels)


def settings(**overrides) -> ServiceSettings:
    return ServiceSettings(**{"device": "cpu", "max_wait_ms": 5, "face_detector": "haar", **overrides})


def scores(engine, features, classes, prompt_set):
    return classify(features, engine.class_features(classes, prompt_set), classes)


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture
def client(engine):
    app = create_app(settings(), engine_factory=lambda s: engine)
    with TestClient(app) as c:
        wait_ready(c)
        yield c


@asynccontextmanager
async def serving(app):
    """The app's lifespan plus an async client, for tests that need requests in flight together."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            for _ in range(200):
                if (await client.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"never ready: {(await client.get('/readyz')).json()}")
            yield client


def post_image(client, data: bytes, **fields):
    return client.post("/predict", files={"file": ("x.png", data, "image/png")}, data=fields)


# ---- readiness ----------------------------------------------------------------------------------
def test_readiness_flips_after_warm_up(engine):
    release = threading.Event()

    def slow_factory(_):
        release.wait(10)
        return engine

    app = create_app(settings(), engine_factory=slow_factory)
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
    app = create_app(settings(device_threads=3, decode_workers=2), engine_factory=lambda s: engine)
    with TestClient(app) as client:
        wait_ready(client)
        runtime = app.state.runtime
        assert client.portal.call(runtime.batcher.run, torch.get_num_threads) == 3  # the device thread
        assert client.portal.call(runtime.offload, torch.get_num_threads) == 1  # a decode thread
    assert torch.get_num_threads() == default


def test_the_process_entry_point_gives_the_cpus_to_the_encoder_and_pins_its_own_thread():
    from service.process import configure_process

    seen = {}

    def entry_point():  # a thread of its own: the pinning is that thread's
        cpus = torch.get_num_threads()
        resolved = configure_process(ServiceSettings(decode_workers=5))
        seen.update(cpus=cpus, resolved=resolved, after=torch.get_num_threads())

    thread = threading.Thread(target=entry_point)
    thread.start()
    thread.join()
    assert seen["resolved"].device_threads == seen["cpus"] and seen["resolved"].decode_workers == 5
    assert seen["after"] == 1


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

    with TestClient(create_app(settings(), engine_factory=missing)) as client:
        for _ in range(200):  # the load runs in the background: wait for its outcome, not a fixed time
            answer = client.get("/readyz")
            if answer.json()["detail"] != "loading":
                break
            time.sleep(0.05)
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
    assert set(body["timing"]) == {"decode_ms", "inference_ms", "total_ms"} and body["model"] == "custom"


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
    app = create_app(settings(face_detector="retinaface"), engine_factory=lambda s: engine)
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
    app = create_app(settings(face_detector="none"), engine_factory=lambda s: engine)
    with TestClient(app) as client:
        wait_ready(client)
        assert client.get("/readyz").json()["face_detector"] == "none"
        body = client.post("/predict", files={"file": ("two.png", two_faces()[0], "image/png")}).json()
    assert body["faces"] == [] and body["face_detected"] is False and body["note"] is None


def test_no_face_classifies_the_whole_image_and_says_so(client):
    body = post_image(client, png(face_image(1)), classes="calm,angry").json()
    assert body["face_detected"] is False and "no face" in body["note"]
    assert list(body["probabilities"]) == ["calm", "angry"]


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
        prepared = prepare_video(f, engine, None, PipelineOptions(detect_faces=False, frames=8))
    assert prepared.pixels.shape[0] == 8 and len(prepared.clip.indices) == 8
    assert prepared.clip.frames == []


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


# ---- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "files", "fields", "status", "code"),
    [
        ("/predict", ("a.txt", b"hello", "text/plain"), {}, 415, "unsupported_media_type"),
        ("/predict", ("a.jpg", b"\xff\xd8garbage", "image/jpeg"), {}, 400, "undecodable_media"),
        ("/predict", ("a.jpg", b"", "image/jpeg"), {}, 400, "undecodable_media"),
        ("/predict-video", ("a.png", b"x", "image/png"), {}, 400, "wrong_endpoint"),
        ("/predict-video", ("a.txt", b"x", "text/plain"), {}, 415, "unsupported_media_type"),
        ("/predict", ("a.mp4", "MP4", "video/mp4"), {}, 400, "wrong_endpoint"),
        ("/predict", ("a.mp4", "MP4", "application/octet-stream"), {}, 400, "wrong_endpoint"),
        ("/predict", ("a.png", "PNG", "image/png"), {"classes": ""}, 422, "invalid_field"),
        ("/predict", ("a.png", "PNG", "image/png"), {"classes": "raf_db"}, 422, "invalid_field"),
        ("/predict", ("a.png", "PNG", "image/png"), {"prompts": ""}, 422, "invalid_field"),
        (
            "/retrieve",
            ("a.png", "PNG", "image/png"),
            {"descriptions": '["a"]', "top_k": "0"},
            422,
            "invalid_field",
        ),
        (
            "/retrieve",
            ("a.png", "PNG", "image/png"),
            {"descriptions": '["a"]', "frames": "0"},
            422,
            "invalid_field",
        ),
        ("/predict-video", ("a.mp4", b"\x00" * 2000, "video/mp4"), {}, 400, "undecodable_media"),
        ("/predict", ("a.png", "PNG", "image/png"), {"prompts": "P-9"}, 422, "invalid_field"),
        ("/predict", ("a.png", "PNG", "image/png"), {"classes": " , "}, 422, "invalid_field"),
        (
            "/predict",
            ("a.png", "PNG", "image/png"),
            {"classes": ",".join(f"c{i}" for i in range(99))},
            422,
            "invalid_field",
        ),
        ("/predict-video", ("a.mp4", "MP4", "video/mp4"), {"frames": "999"}, 422, "invalid_field"),
        ("/predict-video", ("a.mp4", "MP4", "video/mp4"), {"frames": "0"}, 422, "invalid_field"),
        ("/retrieve", ("a.png", "PNG", "image/png"), {"descriptions": "smiles"}, 422, "invalid_field"),
        ("/retrieve", ("a.png", "PNG", "image/png"), {"descriptions": "[]"}, 422, "invalid_field"),
        (
            "/retrieve",
            ("a.png", "PNG", "image/png"),
            {"descriptions": json.dumps(["x"] * 600)},
            422,
            "invalid_field",
        ),
        (
            "/retrieve",
            ("a.png", "PNG", "image/png"),
            {"descriptions": json.dumps(["x" * 2000])},
            422,
            "invalid_field",
        ),
        ("/retrieve", ("a.png", "PNG", "image/png"), {}, 422, "invalid_field"),
        # Found by fuzzing (each was a 500): a lone surrogate escape, deep nesting, a thin strip with
        # face detection on (now refused by its shape, before detection).
        ("/retrieve", ("a.png", "PNG", "image/png"), {"descriptions": '["\\ud800"]'}, 422, "invalid_field"),
        (
            "/retrieve",
            ("a.png", "PNG", "image/png"),
            {"descriptions": "[" * 5000 + "]" * 5000},
            422,
            "invalid_field",
        ),
        ("/predict", ("a.png", png(Image.new("RGB", (3000, 2))), "image/png"), {}, 400, "undecodable_media"),
    ],
)
def test_bad_input_gets_a_json_error_and_the_service_stays_healthy(
    client, tmp_path, path, files, fields, status, code
):
    name, data, media_type = files
    if data == "PNG":
        data = png(face_image(0))
    elif data == "MP4":
        data = make_video(tmp_path / "c.mp4", 10).read_bytes()
    answer = client.post(path, files={"file": (name, data, media_type)}, data=fields)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"] == code and answer.json()["detail"]
    assert "Traceback" not in answer.text
    assert post_image(client, png(face_image(0))).status_code == 200


@pytest.mark.parametrize(
    ("path", "upload", "fields", "status", "message"),
    [
        (
            "/predict",
            "PNG",
            {"classes": ""},
            422,
            "classes: the field is empty; leave it out for the default",
        ),
        ("/predict", "PNG", {"classes": "raf_db"}, 422, "needs at least two classes; did you mean raf-db?"),
        ("/predict", "PNG", {"classes": "calm"}, 422, "needs at least two classes; give a preset"),
        (
            "/predict",
            "PNG",
            {"prompts": "P-9"},
            422,
            "prompts: Input should be 'P-1', 'P-2', 'P-3', 'P-4' or 'P-5'",
        ),
        ("/predict-video", "MP4", {"frames": "999"}, 422, "frames: at most 64 frames may be sampled"),
        ("/predict-video", "MP4", {"frames": "0"}, 422, "frames: Input should be greater than or equal to 1"),
        ("/retrieve", "MP4", {"descriptions": '["a"]', "top_k": "0"}, 422, "top_k: Input should be greater"),
        ("/predict", "MP4", {}, 400, "the file is a video, not an image: send it to POST /predict-video"),
        (
            "/predict-video",
            "JPG",
            {},
            400,
            "the file is a still image, not a video: send it to POST /predict",
        ),
    ],
)
def test_a_mistaken_request_is_refused_with_a_sentence_that_says_what_to_do(
    client, tmp_path, path, upload, fields, status, message
):
    files = {
        "PNG": ("a.png", png(face_image(0)), "image/png"),
        "JPG": ("a.jpg", jpeg(face_image(0)), "image/jpeg"),
        "MP4": ("a.mp4", make_video(tmp_path / "c.mp4", 10).read_bytes(), "application/octet-stream"),
    }
    answer = client.post(path, files={"file": files[upload]}, data=fields)
    assert answer.status_code == status and message in answer.json()["detail"], answer.text


def test_a_truncated_animated_gif_without_a_type_is_served_as_the_frames_it_has(client):
    """Pillow's header check raised IndexError on it (a 500); FFmpeg decodes the frames that are there."""
    gif = io.BytesIO()
    face_image(0).save(gif, "GIF", save_all=True, append_images=[face_image(1)])
    cut = gif.getvalue()[:11300]  # inside the second frame
    answer = client.post(
        "/retrieve",
        files={"file": ("a.gif", cut, "application/octet-stream")},
        data={"descriptions": '["a"]'},
    )
    assert answer.status_code == 200 and answer.json()["media"] == "video"


def test_media_over_the_pixel_limit_is_refused_before_decoding(engine):
    app = create_app(settings(max_image_pixels=10_000), engine_factory=lambda s: engine)
    with TestClient(app) as client:
        wait_ready(client)
        answer = post_image(client, png(Image.new("RGB", (200, 200))))
        assert answer.status_code == 413 and answer.json()["error"] == "media_too_large"


def test_uploads_over_the_limit_get_413(engine):
    app = create_app(settings(max_upload_mb=0.01), engine_factory=lambda s: engine)
    with TestClient(app) as client:
        wait_ready(client)
        answer = post_image(client, b"\x00" * 50_000)
        assert answer.status_code == 413 and answer.json()["error"] == "upload_too_large"
        assert post_image(client, png(face_image(0, size=(20, 20)))).status_code == 200


def test_the_upload_limit_stops_reading_a_stream_without_content_length():
    """Chunks are counted as they arrive; the app stops reading soon after the limit."""
    consumed = 0

    async def receive():
        nonlocal consumed
        consumed += 1
        return {"type": "http.request", "body": b"x" * 1024, "more_body": consumed < 1000}

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        raise AssertionError("the whole body was read")

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": []}
    asyncio.run(
        UploadLimits(app, max_bytes=5 * 1024, max_inflight_bytes=10**9, timeout_s=60)(scope, receive, send)
    )
    assert consumed == 6 and sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"] == "upload_too_large"


# ---- batching, back-pressure, failures -------------------------------------------------------------
def test_concurrent_requests_share_encoder_calls(engine):
    gated = GatedEngine(engine)
    app = create_app(settings(max_wait_ms=500, max_batch=64), engine_factory=lambda s: gated)

    async def main():
        async with serving(app) as client:
            before = len(gated.calls)
            images = [png(face_image(i)) for i in range(8)]
            answers = await asyncio.gather(
                *(client.post("/predict", files={"file": ("x.png", im, "image/png")}) for im in images)
            )
            return answers, gated.calls[before:]

    answers, calls = run_bounded(main())
    assert all(a.status_code == 200 for a in answers)
    assert sum(calls) == 8 and len(calls) < 8, calls


def test_a_full_queue_answers_429_at_once_before_any_decoding(engine):
    gated = GatedEngine(engine)
    app = create_app(
        settings(
            max_batch=1, max_queue=2, max_frames=1, max_faces=1, max_descriptions=1, max_request_items=2
        ),
        engine_factory=lambda s: gated,
    )

    async def main():
        async with serving(app) as client:
            gated.gate.clear()
            gated.entered.clear()  # the warm-up set it
            admission = app.state.runtime.admission

            def send():
                return client.post("/predict", files={"file": ("x.png", png(face_image(1)), "image/png")})

            first = asyncio.create_task(send())  # taken by the held device
            assert await asyncio.to_thread(gated.entered.wait, 5)
            second = asyncio.create_task(send())  # admitted: the queue is now full
            while admission.depth < 2:
                await asyncio.sleep(0.01)
            for _ in range(20):
                admission.observe("image", 1, 10.0)  # a slow device: the header is not always 1
            prepared = gated.prepared
            third = await send()
            expected = admission.retry_after()  # the queue is unchanged: still held
            assert gated.prepared == prepared, "the refused request was decoded"
            gated.gate.set()
            return await first, await second, third, await send(), expected

    first, second, third, after, expected = run_bounded(main())
    assert third.status_code == 429 and third.json()["error"] == "queue_full"
    assert int(third.headers["retry-after"]) == expected and expected >= 15  # 2 items at ~10 s each
    assert first.status_code == second.status_code == after.status_code == 200


def test_a_failing_batch_fails_its_request_and_the_next_one_succeeds(engine):
    gated = GatedEngine(engine)
    with TestClient(create_app(settings(), engine_factory=lambda s: gated)) as client:
        wait_ready(client)
        gated.fail_next = True
        failed = post_image(client, png(face_image(0)))
        assert failed.status_code == 500 and failed.json()["error"] == "inference_failed"
        assert "Traceback" not in failed.text
        assert post_image(client, png(face_image(0))).status_code == 200


def test_a_client_that_disconnects_is_dropped_from_the_queue(engine):
    gated = GatedEngine(engine)
    app = create_app(settings(max_batch=1), engine_factory=lambda s: gated)
    request = httpx.Request(
        "POST", "http://test/predict", files={"file": ("x.png", png(face_image(3)), "image/png")}
    )
    body = request.read()

    async def raw_request(leave: asyncio.Event):
        """Sends the upload, then reports the client gone once `leave` is set."""
        delivered = False

        async def receive():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await leave.wait()
            return {"type": "http.disconnect"}

        messages = []

        async def send(message):
            messages.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/predict",
            "raw_path": b"/predict",
            "query_string": b"",
            "root_path": "",
            "server": ("test", 80),
            "client": ("127.0.0.1", 1),
            "headers": [(k.lower().encode(), v.encode()) for k, v in request.headers.items()],
        }
        await app(scope, receive, send)
        return messages

    async def main():
        async with serving(app) as client:
            gated.gate.clear()
            gated.entered.clear()  # the warm-up set it

            def send():
                return client.post("/predict", files={"file": ("x.png", png(face_image(1)), "image/png")})

            busy = asyncio.create_task(send())
            assert await asyncio.to_thread(gated.entered.wait, 5)  # the device holds the busy request
            calls_before = len(gated.calls)
            leave = asyncio.Event()
            gone = asyncio.create_task(raw_request(leave))
            batcher = app.state.runtime.batcher
            while batcher.depth < 1:  # queued behind the busy request
                await asyncio.sleep(0.01)
            leave.set()
            await gone
            assert batcher.depth == 0  # dropped from the queue as soon as its client left
            gated.gate.set()
            assert (await busy).status_code == 200
            assert (await send()).status_code == 200  # the batcher has served on past the dropped job
            return gated.calls[calls_before:]

    later_calls = run_bounded(main())
    assert later_calls == [1, 1], "only the busy request's and the next one's items reached the encoder"


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


def test_service_settings_are_validated():
    with pytest.raises(ValueError, match="FER_MAX_QUEUE"):
        ServiceSettings(max_queue=8, max_batch=32)


# ---- fer serve ---------------------------------------------------------------------------------------
def test_fer_serve_on_a_port_in_use_fails_at_once(monkeypatch, capsys):
    import socket

    from cli.main import main

    monkeypatch.setenv("FER_PRESET", "demo")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        assert main(["serve", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert time.monotonic() - started < 5  # refused before any model was loaded


def test_fer_serve_refuses_to_start_without_weights(monkeypatch, tmp_path, capsys):
    from cli.main import main

    monkeypatch.setenv("FER_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("FER_PRESET", "exp-clip-b32")
    assert main(["serve", "--port", str(free_port())]) == 2
    assert "fer weights download exp-clip-b32" in capsys.readouterr().err


def test_fer_serve_refuses_settings_that_cannot_work(model_env, monkeypatch, capsys):
    from cli.main import main

    monkeypatch.setenv("FER_DTYPE", "float16")  # model_env sets FER_DEVICE=cpu
    assert main(["serve", "--port", str(free_port())]) == 2
    assert "FER_DTYPE=float16 runs on CUDA only" in capsys.readouterr().err
    monkeypatch.setenv("FER_DTYPE", "float32")
    assert main(["serve", "--port", str(free_port()), "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("preset, expected", [(None, "10000"), ("300000", "300000")])
def test_fer_serve_sets_the_openmp_spin_count_unless_the_user_did(model_env, monkeypatch, preset, expected):
    import uvicorn

    import service.process
    from cli.main import main

    monkeypatch.setenv("GOMP_SPINCOUNT", preset or "")  # recorded, so the test's change is undone
    if preset is None:
        monkeypatch.delenv("GOMP_SPINCOUNT")
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(spin=os.environ.get("GOMP_SPINCOUNT")))
    monkeypatch.setattr(service.process, "pin_torch_threads", lambda n: None)  # this thread is the test's
    assert main(["serve", "--port", str(free_port())]) == 0
    assert seen == {"spin": expected}


@pytest.mark.slow
def test_fer_serve_answers_every_endpoint_with_a_full_size_model(tmp_path, full_size_checkpoint):
    """`fer serve` on a random-weight ViT-B-32 checkpoint and a random official-format projection, both
    given by path, over real HTTP on loopback."""
    clip_path, projection_path = full_size_checkpoint
    env = {
        "FER_CLIP_MODEL": "ViT-B-32",
        "FER_CLIP_WEIGHTS": str(clip_path),
        "FER_PROJECTION": str(projection_path),
        "FER_FACE_DETECTOR": "haar",
        "FER_DEVICE": "cpu",
    }
    with fer_serve(env) as (http, _):
        data, _ = two_faces()
        image = http.post("/predict", files={"file": ("f.png", data, "image/png")}).json()
        assert len(image["faces"]) == 2 and len(image["probabilities"]) == 7
        clip = make_video(tmp_path / "c.mp4", 30).read_bytes()
        video = http.post("/predict-video", files={"file": ("c.mp4", clip, "video/mp4")}).json()
        assert video["frames_sampled"] == 16
        ranked = http.post(
            "/retrieve", files={"file": ("c.mp4", clip, "video/mp4")}, data={"descriptions": '["a", "b"]'}
        ).json()
        assert len(ranked["ranking"]) == 2
        assert http.get("/labels").status_code == 200 and "fer_batch_size" in http.get("/metrics").text


@pytest.mark.slow
def test_fer_serve_with_several_worker_processes():
    from bench.server import process_tree

    with fer_serve({"FER_PRESET": "demo", "FER_DEVICE": "cpu", "FER_WORKERS": "2"}) as (http, server):
        answers = [
            http.post("/predict", files={"file": ("f.png", png(face_image(i)), "image/png")})
            for i in range(4)
        ]
        assert [a.status_code for a in answers] == [200] * 4
        # uvicorn spawns its workers through multiprocessing; its resource tracker is a child too
        workers = [p for p in process_tree(server.pid)[1:] if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 2, "expected one worker process per FER_WORKERS"

        # Fresh connections land on either worker; every scrape counts every process's requests.
        url = str(http.base_url)
        deadline = time.monotonic() + 120
        while _scrape(url).get("fer_ready_processes") != 2:  # the second worker may still be loading
            assert time.monotonic() < deadline, "the second worker did not report ready"
            time.sleep(0.2)
        image = png(face_image(0))
        fresh = [
            httpx.post(f"{url}/predict", files={"file": ("f.png", image, "image/png")}, timeout=60)
            for _ in range(6)
        ]
        assert [a.status_code for a in fresh] == [200] * 6
        for _ in range(6):
            assert _scrape(url)["fer_requests_total"] == 4 + 6


def _scrape(url: str) -> dict[str, float]:
    """fer_ready_processes and /predict's fer_requests_total, from a scrape on a fresh connection."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=60).text):
        for sample in family.samples:
            if sample.name == "fer_ready_processes" or (
                sample.name == "fer_requests_total" and sample.labels["endpoint"] == "/predict"
            ):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def test_face_detection_on_a_strip_thinner_than_its_downscale_finds_nothing():
    assert HaarDetector().detect(Image.new("RGB", (3000, 2)), 10) == []  # the short side rounded to 0 px
