"""The request path under load and failure, with a gated encoder: requests share encoder calls, a
full queue refuses before decoding, a failing batch fails only its own requests, and a client that
leaves costs no more work."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

import httpx
from fastapi.testclient import TestClient

from model.faces.base import Box, Face
from service.app import create_app
from tests.support import (
    asgi_request,
    face_image,
    make_video,
    png,
    post_image,
    run_bounded,
    service_settings,
    serving,
    until,
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


class CountingDetector:
    """Counts its calls, which a clip's frames make from several decode threads at once."""

    def __init__(self):
        self._lock = threading.Lock()
        self.calls = 0

    def count(self) -> None:
        with self._lock:
            self.calls += 1


class GatedDetector(CountingDetector):
    """A face detector that finds nothing and holds every call until `gate` is set, counting its calls."""

    name = "gated"

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()  # set when a call starts

    def detect(self, image, max_faces, long_side=None):
        self.count()
        self.entered.set()
        self.gate.wait(10)
        return []


class FacesDetector(CountingDetector):
    """A face detector that finds `faces` faces side by side in every image, counting its calls."""

    name = "fixed"

    def __init__(self, faces: int):
        super().__init__()
        self.faces = faces

    def detect(self, image, max_faces, long_side=None):
        self.count()
        side = image.width // 4
        return [Face(Box(i * side, 0, side, side), 0.9) for i in range(min(self.faces, max_faces))]


# ---- batching, back-pressure, failures -------------------------------------------------------------
def test_concurrent_requests_share_encoder_calls(engine):
    gated = GatedEngine(engine)
    app = create_app(service_settings(max_wait_ms=500, max_batch=64), engine_factory=lambda s: gated)

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
        service_settings(
            max_batch=1,
            max_queue=641,
            text_share=1.0,
            max_frames=1,
            max_faces=1,
            max_descriptions=1,
            max_request_items=2,
        ),
        engine_factory=lambda s: gated,
    )

    async def main():
        async with serving(app) as client:
            gated.gate.clear()
            gated.entered.clear()  # the warm-up set it
            admission = app.state.runtime.admission
            admission.reserve(shared_texts=admission.capacity - 2)  # two places left (a class list must fit)

            def send():
                return client.post("/predict", files={"file": ("x.png", png(face_image(1)), "image/png")})

            first = asyncio.create_task(send())  # taken by the held device
            assert await asyncio.to_thread(gated.entered.wait, 5)
            second = asyncio.create_task(send())  # admitted: the queue is now full
            await until(lambda: admission.depth >= admission.capacity, "the second request's admission")
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
    with TestClient(create_app(service_settings(), engine_factory=lambda s: gated)) as client:
        wait_ready(client)
        gated.fail_next = True
        failed = post_image(client, png(face_image(0)))
        assert failed.status_code == 500 and failed.json()["error"] == "inference_failed"
        assert "Traceback" not in failed.text
        assert post_image(client, png(face_image(0))).status_code == 200


def test_a_client_that_disconnects_is_dropped_from_the_queue(engine):
    gated = GatedEngine(engine)
    app = create_app(service_settings(max_batch=1), engine_factory=lambda s: gated)
    request = httpx.Request(
        "POST", "http://test/predict", files={"file": ("x.png", png(face_image(3)), "image/png")}
    )

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
            gone = asyncio.create_task(asgi_request(app, request, leave.wait))
            batcher = app.state.runtime.batcher
            await until(lambda: batcher.depth >= 1, "the request queued behind the busy one")
            leave.set()
            await gone
            assert batcher.depth == 0  # dropped from the queue as soon as its client left
            gated.gate.set()
            assert (await busy).status_code == 200
            assert (await send()).status_code == 200  # the batcher has served on past the dropped job
            return gated.calls[calls_before:]

    later_calls = run_bounded(main())
    assert later_calls == [1, 1], "only the busy request's and the next one's items reached the encoder"


def test_a_device_failure_is_logged_and_the_client_gets_a_sentence_of_ours(engine, caplog):
    """The device's own error text (a CUDA message, a shape) is for the operator, not the client."""
    gated = GatedEngine(engine)
    with TestClient(create_app(service_settings(), engine_factory=lambda s: gated)) as client:
        wait_ready(client)
        gated.fail_next = True
        with caplog.at_level(logging.ERROR, logger="service"):
            failed = post_image(client, png(face_image(0)))
    assert failed.status_code == 500 and failed.json()["error"] == "inference_failed"
    assert "simulated device failure" not in failed.text and failed.json()["detail"]
    assert "simulated device failure" in caplog.text


# ---- a client that leaves -----------------------------------------------------------------------
def test_a_decode_that_ends_after_its_client_left_goes_no_further(engine):
    """The client leaves while its image's faces are searched (past the decode's last stop check):
    the finished decode must not reach the encoder, whose rows nobody would read."""
    gated = GatedEngine(engine)
    app = create_app(service_settings(), engine_factory=lambda s: gated)
    request = httpx.Request(
        "POST", "http://test/predict", files={"file": ("x.png", png(face_image(3)), "image/png")}
    )

    async def main():
        async with serving(app):
            detector = app.state.runtime.detector = GatedDetector()
            calls_before = len(gated.calls)
            leave, told = asyncio.Event(), asyncio.Event()

            async def leaves():
                await leave.wait()
                told.set()

            gone = asyncio.create_task(asgi_request(app, request, leaves))
            assert await asyncio.to_thread(detector.entered.wait, 10)  # the decode is in face detection
            leave.set()
            await told.wait()  # the request has been told its client left
            detector.gate.set()
            sent = await gone
            return sent[0]["status"], gated.calls[calls_before:]

    status, calls = run_bounded(main())
    assert status == 499 and calls == []


def test_a_cancelled_request_stops_its_decode(engine, tmp_path):
    """Ray Serve cancels a request's task when its client disconnects: the decode stops at its next
    check, as it does for a client that leaves under uvicorn. One decode thread: one frame searched at a
    time."""
    app = create_app(
        service_settings(video_decode_workers=1, decode_workers=1), engine_factory=lambda s: engine
    )
    clip = make_video(tmp_path / "c.mp4", 40).read_bytes()
    request = httpx.Request(
        "POST",
        "http://test/predict-video",
        files={"file": ("c.mp4", clip, "video/mp4")},
        data={"frames": "8"},
    )

    async def main():
        async with serving(app):
            runtime = app.state.runtime
            detector = runtime.detector = GatedDetector()
            task = asyncio.create_task(asgi_request(app, request))
            assert await asyncio.to_thread(detector.entered.wait, 10)  # the first sampled frame's faces
            task.cancel()
            for _ in range(3):  # the cancellation reaches the request's code, which runs until it waits
                await asyncio.sleep(0)
            detector.gate.set()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            # Its one thread: the decode ended, and with it every search it started.
            await runtime.offload(lambda: None, pool=runtime.video_pool)
            return detector.calls

    assert run_bounded(main()) == 1  # of the 8 sampled frames, only the one searched when it was cancelled


# ---- a clip's places: one a frame, then the faces found ---------------------------------------------
def clip_settings(**overrides):
    """64 video places: one 16-frame clip of 4 faces a frame fills them, or four of one face a frame."""
    return service_settings(
        max_queue=1280, video_share=0.05, text_share=0.6, max_frames=16, max_faces=4, **overrides
    )


def post_clip(client, clip: bytes, path: str = "/predict-video", **fields):
    form = {"frames": "16"} | fields
    return client.post(path, files={"file": ("c.mp4", clip, "video/mp4")}, data=form)


def test_concurrent_clips_of_one_face_are_all_admitted(engine, tmp_path):
    """Each clip may give 4 faces a frame, 64 rows, the whole video share: reserved up front, that let
    one clip in at a time. A place a frame, then the faces found, lets in the four together."""
    gated = GatedEngine(engine)
    app = create_app(clip_settings(), engine_factory=lambda s: gated)
    clip = make_video(tmp_path / "c.mp4", 32).read_bytes()

    async def main():
        async with serving(app) as client:
            app.state.runtime.detector = FacesDetector(1)
            admission = app.state.runtime.admission
            gated.gate.clear()  # the clips wait for the encoder, holding their places
            sent = [asyncio.create_task(post_clip(client, clip)) for _ in range(4)]
            await until(
                lambda: admission.depth >= 64 or any(s.done() for s in sent), "the four clips' admission"
            )
            held = admission.depth
            gated.gate.set()
            return held, [(await s).status_code for s in sent], admission.depth

    held, statuses, after = run_bounded(main())
    assert statuses == [200] * 4 and held == 64 and after == 0


def test_a_clip_whose_faces_do_not_fit_is_refused_after_decoding_and_gives_back_its_places(engine, tmp_path):
    """Its 16 places fit when it arrives, its 48 faces do not: 429 as a full queue answers, with the
    wait for what the others hold, and none of its places kept."""
    gated = GatedEngine(engine)
    app = create_app(clip_settings(), engine_factory=lambda s: gated)
    clip = make_video(tmp_path / "c.mp4", 32).read_bytes()
    with TestClient(app) as client:
        wait_ready(client)
        detector = app.state.runtime.detector = FacesDetector(3)
        admission = app.state.runtime.admission
        for _ in range(20):
            admission.observe("image", 1, 10.0)  # a slow device: the header is not always 1
        others = admission.reserve(frames=32)  # 32 of the 64 video places
        calls = len(gated.calls)
        refused = post_clip(client, clip)
        expected = admission.retry_after()  # what the others hold: 32 items at ~10 s each
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"] == "queue_full" and "video frames" in refused.json()["detail"]
        assert int(refused.headers["retry-after"]) == expected and expected > 250
        assert detector.calls == 16 and len(gated.calls) == calls  # decoded, never encoded
        assert admission.depth == 32  # the others' places only
        assert 'fer_refused_total{reason="video_full"} 1.0' in client.get("/metrics").text
        others.release()
        assert post_clip(client, clip).status_code == 200  # a retry, once there is room
        assert admission.depth == 0


def test_a_clip_that_could_never_fit_is_refused_413_before_any_work(engine, tmp_path):
    """Its frames' faces at most (16 x 4) are over what one request may hold: refused at once, though
    its one place a frame would fit."""
    app = create_app(clip_settings(), engine_factory=lambda s: engine)
    clip = make_video(tmp_path / "c.mp4", 32).read_bytes()
    with TestClient(app) as client:
        wait_ready(client)
        detector = app.state.runtime.detector = FacesDetector(1)
        admission = app.state.runtime.admission
        admission.request_share = 63
        refused = post_clip(client, clip)
        assert refused.status_code == 413 and refused.json()["error"] == "too_many_items", refused.text
        assert "FER_MAX_REQUEST_ITEMS" in refused.json()["detail"]
        assert detector.calls == 0 and admission.depth == 0
        assert post_clip(client, clip, frames="15").status_code == 200  # 60 at most: it fits


def test_retrieve_counts_a_clip_s_places_as_predict_video_does_plus_its_texts(engine, tmp_path):
    """Its descriptions are held from admission on, its clip's rows as /predict-video's: with 24 video
    places left, a clip that may give 64 faces but gives 16 gets in."""
    gated = GatedEngine(engine)
    app = create_app(clip_settings(), engine_factory=lambda s: gated)
    clip = make_video(tmp_path / "c.mp4", 32).read_bytes()
    descriptions = '["smiles", "frowns", "looks away"]'

    async def main():
        async with serving(app) as client:
            app.state.runtime.detector = FacesDetector(1)
            admission = app.state.runtime.admission
            others = admission.reserve(frames=40)
            gated.gate.clear()
            gated.entered.clear()  # the warm-up set it
            sent = asyncio.create_task(post_clip(client, clip, "/retrieve", descriptions=descriptions))
            await until(lambda: gated.entered.is_set() or sent.done(), "the clip's rows at the encoder")
            held = admission.depth
            gated.gate.set()
            answer = await sent
            others.release()
            return held, answer, admission.depth

    held, answer, after = run_bounded(main())
    assert answer.status_code == 200, answer.text
    assert held == 40 + 16 + 3 and after == 0  # the others', a face in each of 16 frames, three texts
