"""The request path under load and failure, with a gated encoder: requests share encoder calls, a
full queue refuses before decoding, a failing batch fails only its own requests, and a client that
leaves costs no more work."""

from __future__ import annotations

import asyncio
import threading

import httpx
from fastapi.testclient import TestClient

from service.app import create_app
from tests.support import (
    asgi_request,
    face_image,
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
            await until(lambda: admission.depth >= 2, "the second request's admission")
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
