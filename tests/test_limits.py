"""The service bounded under abuse: decode budgets, admission and fair shares, connection and body
limits, the API key, and error bodies in the project's own words. Timeouts are set short here, and
counts (frames decoded, requests refused) are asserted rather than times."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import signal
import socket
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import model.engine
from cli.main import load_settings, main
from model.engine import create_engine
from model.media import DecodeBudget
from service.app import create_app
from service.limits import UploadLimits
from service.settings import ServiceSettings
from tests.support import (
    asgi_request,
    face_image,
    fer_serve,
    make_video,
    png,
    run_bounded,
    service_settings,
    tiny_settings,
    until,
    wait_ready,
    wait_until,
)


def settings(**overrides) -> ServiceSettings:
    """The tests' service settings without a detector: these limits hold before faces are looked for."""
    return service_settings(**{"face_detector": "none", **overrides})


@pytest.fixture
def client(engine):
    with TestClient(create_app(settings(), engine_factory=lambda s: engine)) as c:
        wait_ready(c)
        yield c


def post_image(client, data: bytes, **kwargs):
    return client.post("/predict", files={"file": ("x.png", data, "image/png")}, **kwargs)


# ---- decode budgets ---------------------------------------------------------------------------------
def test_a_gif_canvas_bomb_is_refused_with_413_before_decoding(engine, monkeypatch):
    decoded = []
    original = DecodeBudget.charge
    monkeypatch.setattr(DecodeBudget, "charge", lambda self, px: decoded.append(px) or original(self, px))
    frames = [Image.new("P", (600, 600), color=i % 2) for i in range(60)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=20)
    app = create_app(settings(max_decode_megapixels=10), engine_factory=lambda s: engine)
    with TestClient(app) as client:
        wait_ready(client)
        for path in ("/predict-video", "/retrieve"):
            fields = {"descriptions": '["a"]'} if path == "/retrieve" else {}
            answer = client.post(path, files={"file": ("b.gif", gif.getvalue(), "image/gif")}, data=fields)
            assert answer.status_code == 413 and "megapixels" in answer.json()["detail"], answer.text
    assert decoded == []  # refused from the plan: not one frame decoded


def test_a_one_key_frame_clip_is_sampled_within_its_budget(client, tmp_path, monkeypatch):
    decoded = []
    original = DecodeBudget.charge
    monkeypatch.setattr(DecodeBudget, "charge", lambda self, px: decoded.append(px) or original(self, px))
    clip = make_video(tmp_path / "one-key.mp4", 1000, gop=100_000).read_bytes()
    answer = client.post("/predict-video", files={"file": ("c.mp4", clip, "video/mp4")})
    assert answer.status_code == 200
    assert len(decoded) <= 1000  # forward once, never the same stretch twice


def test_a_client_that_leaves_stops_its_decode(engine, tmp_path, monkeypatch):
    """A slow decode (10 ms a frame here) of a clip whose client disconnects once it is decoding."""
    decoded = []
    original = DecodeBudget.charge

    def slow(self, pixels):
        decoded.append(pixels)
        time.sleep(0.01)
        original(self, pixels)

    monkeypatch.setattr(DecodeBudget, "charge", slow)
    app = create_app(settings(), engine_factory=lambda s: engine)
    request = httpx.Request(
        "POST",
        "http://t/predict-video",
        files={"file": ("c.mp4", make_video(tmp_path / "c.mp4", 500).read_bytes())},
    )

    async def main():
        async with app.router.lifespan_context(app):
            await until(lambda: app.state.runtime.ready, "the model's load")
            # The client leaves once decoding has started.
            return await asgi_request(app, request, lambda: until(lambda: decoded, "the first decoded frame"))

    sent = run_bounded(main())
    assert sent[0]["status"] == 499
    assert len(decoded) < 480  # stopped well before the last sampled frame (about 485)


# ---- admission and fair shares ------------------------------------------------------------------------
def test_video_frames_cannot_take_the_places_images_need(engine):
    app = create_app(
        settings(max_queue=1200, video_share=0.05, text_share=0.6, max_frames=16, max_faces=1),
        engine_factory=lambda s: engine,
    )
    with TestClient(app) as client:
        wait_ready(client)
        admission = app.state.runtime.admission
        held = [admission.reserve(frames=16) for _ in range(3)]  # 48 of the 60 video places (5%)
        refused = client.post(
            "/predict-video", files={"file": ("c.mp4", b"x" * 100, "video/mp4")}, data={"frames": "16"}
        )
        assert refused.status_code == 429 and "video frames" in refused.json()["detail"]
        assert post_image(client, png(face_image(0))).status_code == 200  # images still get in
        assert 'fer_refused_total{reason="video_full"} 1.0' in client.get("/metrics").text
        for places in held:
            places.release()


def test_a_class_list_cached_at_admission_is_not_encoded_when_evicted_before_use(
    tiny_clip_path, official_projection_path, monkeypatch
):
    """Admission counted no texts for a cached list; evicted before the request scores, the features it
    was admitted with are still what it uses, not an encoding outside the texts' share."""
    engine = create_engine(tiny_settings(tiny_clip_path, official_projection_path))
    app = create_app(settings(), engine_factory=lambda s: engine)
    with TestClient(app) as client:

        def predict(seed: int) -> int:
            upload = {"file": ("x.png", png(face_image(seed)), "image/png")}
            return client.post("/predict", files=upload, data={"classes": "calm,tense"}).status_code

        wait_ready(client)
        assert predict(0) == 200  # the list is cached now
        encoded = []
        encode_texts = engine.encode_texts
        monkeypatch.setattr(
            engine, "encode_texts", lambda texts: encoded.append(texts) or encode_texts(texts)
        )
        batcher = app.state.runtime.batcher
        submit, evicted = batcher.submit, []

        async def submit_then_evict(*args, **kwargs):  # between admission and scoring
            monkeypatch.setattr(model.engine, "TEXT_CACHE_BYTES", 1)
            engine.class_features(("bored", "keen"), "P-3")  # the newest list alone stays
            evicted.append(engine.cached_class_features(("calm", "tense"), "P-3") is None)
            return await submit(*args, **kwargs)

        monkeypatch.setattr(batcher, "submit", submit_then_evict)
        assert predict(1) == 200
    assert evicted == [True]
    assert [texts for texts in encoded if "calm" in " ".join(texts)] == []


# ---- request bodies ---------------------------------------------------------------------------------
def test_the_documented_text_limits_are_the_real_ones(client):
    """512 descriptions of 1,000 characters in any script, however the client's JSON escapes them."""
    cjk = "表情" * 500
    for ensure_ascii in (False, True):  # 3 bytes a character, or a 6-byte \\uXXXX escape
        texts = json.dumps([cjk] * 512, ensure_ascii=ensure_ascii)
        answer = client.post(
            "/retrieve",
            files={"file": ("f.png", png(face_image(1)), "image/png")},
            data={"descriptions": texts},
        )
        assert answer.status_code == 200, answer.text[:200]
        assert len(answer.json()["ranking"]) == 10


def test_an_empty_descriptions_field_says_what_it_needs(client):
    for fields in ({"descriptions": ""}, {}):
        answer = client.post(
            "/retrieve", files={"file": ("f.png", png(face_image(1)), "image/png")}, data=fields
        )
        assert answer.status_code == 422
        assert answer.json()["detail"] == (
            'descriptions: the field is required: a JSON array of non-blank strings, e.g. ["smiles", "frowns"]'
        )


def test_error_bodies_carry_a_request_id_and_no_library_text(client, caplog):
    broken_png = png(face_image(0))[:60]
    caplog.set_level("INFO", logger="service.errors")
    for path, upload in (
        ("/predict", ("a.jpg", b"\xff\xd8\xff\xe0garbage" * 10, "image/jpeg")),
        ("/predict", ("a.png", broken_png, "image/png")),
        ("/predict-video", ("a.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\x01" * 500, "video/mp4")),
    ):
        answer = client.post(path, files={"file": upload}, headers={"X-Request-ID": "abc-123"})
        body = answer.json()
        assert answer.status_code == 400 and body["request_id"] == "abc-123", body
        assert answer.headers["x-request-id"] == "abc-123"
        for library_words in ("Errno", "avcodec", "cannot identify", "truncated PNG", "Invalid data", "PIL"):
            assert library_words not in body["detail"], body
    assert any("abc-123" in r.getMessage() for r in caplog.records)  # the library's words are in the log
    generated = post_image(client, b"junk").json()["request_id"]
    assert len(generated) == 32  # made for a request that brought none


def test_behind_serves_proxy_the_app_takes_its_request_id_and_adds_none(engine):
    """Ray Serve's proxy puts its id in the request and on the answer (test_ray runs the real one)."""
    app = create_app(settings(), engine_factory=lambda s: engine, request_ids_from_proxy=True)
    with TestClient(app) as client:
        wait_ready(client)
        answer = post_image(client, b"junk", headers={"X-Request-ID": "the proxy's id"})
    assert answer.json()["request_id"] == "the proxy's id" and "x-request-id" not in answer.headers


@pytest.mark.parametrize(
    ("sent", "passed"),
    [
        ([b"abc-1"], [b"abc-1"]),
        ([b"not plain"], []),  # Serve's own middleware, which comes next, then makes one
        ([b"abc-1", b"abc-2"], [b"abc-1"]),  # the first, as Serve reads it, and only that one
        ([b"x" * 65, b"abc-2"], []),
        ([], []),
    ],
)
def test_serves_proxy_passes_on_a_plain_request_id_only(sent, passed):
    from service.request_ids import serve_proxy_middlewares

    seen = []

    async def serve_app(scope, receive, send):
        seen.extend(value for name, value in scope["headers"] if name == b"x-request-id")

    (middleware,) = serve_proxy_middlewares()
    proxy = middleware.cls(serve_app, *middleware.args, **middleware.kwargs)
    headers = [(b"host", b"x"), *((b"x-request-id", value) for value in sent)]
    run_bounded(proxy({"type": "http", "headers": headers}, None, None))
    assert seen == passed


# ---- access -----------------------------------------------------------------------------------------
def test_an_api_key_guards_everything_but_liveness_and_the_page(engine):
    app = create_app(
        settings(api_key="s3cret", cors_origins="https://app.example"), engine_factory=lambda s: engine
    )
    with TestClient(app) as client:
        assert client.get("/livez").status_code == 200 and client.get("/").status_code == 200
        for path in ("/readyz", "/metrics", "/labels", "/docs", "/openapi.json"):
            answer = client.get(path)
            assert answer.status_code == 401 and answer.json()["error"] == "unauthorized", path
        assert post_image(client, png(face_image(0))).status_code == 401
        assert post_image(client, png(face_image(0)), headers={"X-API-Key": "wrong"}).status_code == 401
        for header in ({"X-API-Key": "s3cret"}, {"Authorization": "Bearer s3cret"}):
            client.headers.update(header)
            wait_ready(client)
            assert post_image(client, png(face_image(0))).status_code == 200
            client.headers.pop(next(iter(header)))
        preflight = client.options(
            "/predict",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"


def test_an_empty_api_key_refuses_to_start(monkeypatch):
    """`-e FER_API_KEY=$KEY` with KEY unset would install a key that a request without one matches."""
    for empty in ("", "  "):
        monkeypatch.setenv("FER_API_KEY", empty)
        with pytest.raises(ValueError, match=r"FER_API_KEY.*empty") as refused:
            load_settings("service")
        assert "\n" not in str(refused.value)


# ---- connections, through `fer serve` ------------------------------------------------------------------
@pytest.fixture(scope="module")
def served():
    """`fer serve` (demo) with short connection limits; yields (port, process)."""
    env = {
        "FER_PRESET": "demo",
        "FER_FACE_DETECTOR": "none",
        "FER_HEADER_TIMEOUT_S": "1",
        "FER_KEEP_ALIVE_S": "1",
        "FER_BODY_TIMEOUT_S": "1.5",
        "FER_MAX_HEADER_KB": "4",
        "FER_MAX_CONNECTIONS": "8",
        "FER_MAX_UPLOAD_MB": "0.1",
        "FER_MAX_UPLOADS_MB": "0.1",
        "FER_SHUTDOWN_GRACE_S": "2",
        "FER_LINGER_S": "1",
    }
    with fer_serve(env) as (http, server):
        yield http.base_url.port, server


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def closed_by_server(sock: socket.socket) -> bytes:
    """What the server sent before closing the connection (waits up to the socket's timeout)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_an_idle_connection_and_a_slow_head_are_closed(served):
    port, _ = served
    with connect(port) as idle:
        assert closed_by_server(idle) == b""  # nothing sent: closed at the head deadline
    with connect(port) as slow:
        slow.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
        with contextlib.suppress(OSError):
            for _ in range(30):  # a header line every 0.2 s: the head never completes in time
                slow.sendall(b"X-Slow: 1\r\n")
                time.sleep(0.2)
        assert closed_by_server(slow) == b""


def test_a_keep_alive_connection_idle_after_its_answer_is_closed(served):
    port, _ = served
    with connect(port) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = closed_by_server(sock)
    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1") == 1


def test_a_head_over_its_size_is_refused(served):
    port, _ = served
    with connect(port) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000)
        answer = closed_by_server(sock)
    assert answer.startswith(b"HTTP/1.1 431")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert f"content-length: {len(body)}".encode() in head.lower()  # the whole body, as announced
    assert json.loads(body)["error"] == "header_too_large"


def test_connections_beyond_the_cap_are_refused(served):
    port, _ = served
    held = [connect(port) for _ in range(8 + 64)]  # at the cap, and the answered overflow
    try:
        extra = connect(port)
        assert closed_by_server(extra) == b""  # closed at once, unanswered
        held[-1].sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held[-1].recv(100).startswith(b"HTTP/1.1 503")
    finally:
        for sock in held:
            sock.close()
    # The server notices the closed sockets a moment later.
    wait_until(lambda: _answers(f"http://127.0.0.1:{port}/livez"), "/livez answering again", seconds=10)


def _answers(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url).status_code == 200
    return False


def test_a_trickled_body_gets_408_and_uploads_in_flight_are_bounded(served):
    port, _ = served
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    start = head + b"Content-Length: 80000\r\n\r\n" + part + b"x" * 60_000  # 60 KB of 80 KB promised
    with connect(port) as slow, connect(port) as second:
        slow.sendall(start)
        time.sleep(0.3)
        second.sendall(start)  # 60 KB received + 60 KB more would pass the 0.1 MB bound
        refused = closed_by_server(second)
        assert refused.startswith(b"HTTP/1.1 503") and b"uploads_full" in refused
        assert closed_by_server(slow).startswith(b"HTTP/1.1 408")


def test_an_upload_stops_counting_once_its_answer_is_sent():
    """A client that sends large uploads one after another is not refused because the previous request is
    still cleaning up after its answer."""
    cleaning_up = asyncio.Event()
    limits = None

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        assert limits.inflight == 600
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
        assert limits.inflight == 0  # the answer is out; the next upload fits
        await cleaning_up.wait()

    limits = UploadLimits(app, max_bytes=1000, max_inflight_bytes=1000, timeout_s=5)
    chunks = [{"type": "http.request", "body": b"x" * 300, "more_body": True},
              {"type": "http.request", "body": b"x" * 300, "more_body": False}]  # fmt: skip
    sent = []

    async def receive():
        return chunks.pop(0)

    answered = asyncio.Event()

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body":
            answered.set()

    async def one_request():
        scope = {"type": "http", "headers": [(b"content-length", b"600")]}
        request = asyncio.create_task(limits(scope, receive, send))
        await answered.wait()
        assert limits.inflight == 0 and not request.done()
        cleaning_up.set()
        await request
        assert limits.inflight == 0  # released once, not twice

    run_bounded(one_request(), 10)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


async def read_body_and_answer(scope, receive, send) -> None:
    """An app that reads its whole body, then answers 200."""
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def upload_scope(declared: int) -> dict:
    return {"type": "http", "headers": [(b"content-length", str(declared).encode())]}


def test_silent_uploads_hold_no_part_of_the_upload_budget():
    """Four requests that declare 50 MB and send nothing: a 1 KB upload still gets in, since the budget
    counts the bytes that arrive, not the ones promised."""
    limits = UploadLimits(
        read_body_and_answer, max_bytes=50 * 2**20, max_inflight_bytes=200 * 2**20, timeout_s=10
    )
    answered = []

    async def main():
        never = asyncio.Event()

        async def silent():
            await never.wait()

        async def one_kb():
            return {"type": "http.request", "body": b"x" * 1024, "more_body": False}

        async def send(message):
            answered.append(message)

        held = [asyncio.create_task(limits(upload_scope(50 * 2**20), silent, send)) for _ in range(4)]
        await asyncio.sleep(0.05)  # the four are waiting for their bodies
        await limits(upload_scope(1024), one_kb, send)
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)

    run_bounded(main(), 10)
    assert answered[0]["status"] == 200


def test_upload_bytes_are_bounded_as_they_arrive():
    limits = UploadLimits(read_body_and_answer, max_bytes=1000, max_inflight_bytes=1000, timeout_s=10)
    answered = []

    async def main():
        stalled = asyncio.Event()
        first_parts = [{"type": "http.request", "body": b"x" * 600, "more_body": True}]

        async def six_hundred_then_stall():
            if first_parts:
                return first_parts.pop()
            await stalled.wait()

        async def six_hundred():
            return {"type": "http.request", "body": b"y" * 600, "more_body": False}

        async def send(message):
            answered.append(message)

        first = asyncio.create_task(limits(upload_scope(600), six_hundred_then_stall, send))
        await asyncio.sleep(0.05)  # the first holds its 600 bytes
        await limits(upload_scope(600), six_hundred, send)
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        return limits.inflight

    assert run_bounded(main(), 10) == 0  # what the cancelled first held is given back
    assert answered[0]["status"] == 503 and b"uploads_full" in answered[1]["body"]


def test_shutdown_waits_no_longer_than_its_grace_for_a_held_upload():
    env = {"FER_PRESET": "demo", "FER_SHUTDOWN_GRACE_S": "1", "FER_BODY_TIMEOUT_S": "600"}
    with fer_serve(env, ready_path="/livez") as (http, server), connect(http.base_url.port) as held:
        held.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc")
        time.sleep(0.3)
        server.send_signal(signal.SIGTERM)
        # TimeoutExpired if the held upload (600 s of body timeout) kept it past its 1 s grace
        server.wait(timeout=20)


def test_metrics_can_be_served_on_a_port_of_their_own(engine):
    app = create_app(settings(metrics_port=9), engine_factory=lambda s: engine)
    with TestClient(app) as client:
        answer = client.get("/metrics")
        assert answer.status_code == 404 and "FER_METRICS_PORT" in answer.json()["detail"]


def test_the_settings_refuse_limits_that_do_not_fit_together():
    with pytest.raises(ValueError, match="FER_MAX_REQUEST_ITEMS"):
        ServiceSettings(max_request_items=100)  # below FER_MAX_FRAMES + FER_MAX_DESCRIPTIONS
    with pytest.raises(ValueError, match="FER_VIDEO_SHARE"):
        ServiceSettings(max_queue=600, video_share=0.05)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        # uploads between the two would get 503 "retry later" forever, even on an idle server
        ({"max_upload_mb": 300}, "FER_MAX_UPLOAD_MB (300) is above FER_MAX_UPLOADS_MB (200): "),
        # every request for FER_MAX_FRAMES frames would decode more than it may: 413
        ({"max_decode_frames": 32}, "FER_MAX_DECODE_FRAMES (32) is below FER_MAX_FRAMES (64): "),
    ],
)
def test_settings_that_contradict_each_other_are_refused(fields, message, monkeypatch, capsys):
    with pytest.raises(ValueError, match=re.escape(message)):
        ServiceSettings(**fields)
    for name, value in fields.items():
        monkeypatch.setenv(f"FER_{name.upper()}", str(value))
    with socket.create_server(("127.0.0.1", 0)) as taken:  # were they accepted, the bind would fail
        assert main(["serve", "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fer: error: invalid FER_* configuration: {message}") and err.count("\n") == 1
    assert "Value error" not in err


def test_fer_serve_refuses_a_metrics_port_that_is_its_own(monkeypatch, capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:  # were the ports not compared, binding would fail
        port = taken.getsockname()[1]
        monkeypatch.setenv("FER_PRESET", "demo")
        monkeypatch.setenv("FER_METRICS_PORT", str(port))
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"fer: error: FER_METRICS_PORT is the service's own port ({port}): give /metrics another port, "
        "or unset it to serve /metrics on the service's\n"
    )


def test_a_command_refuses_more_frames_than_it_may_decode(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FER_MAX_DECODE_FRAMES", "8")
    clip = make_video(tmp_path / "clip.mp4", 20)
    assert main(["predict-video", str(clip), "--frames", "16"]) == 2
    assert capsys.readouterr().err == (
        "fer: error: --frames 16 is above FER_MAX_DECODE_FRAMES (8): sampling 16 frames decodes at least 16\n"
    )
