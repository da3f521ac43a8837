"""What tests share besides fixtures: the tiny model's settings, synthetic images and clips, polls with
a deadline, a `fer serve` launcher and a raw ASGI request. Fixtures live in conftest.py."""

from __future__ import annotations

import asyncio
import inspect
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from fractions import Fraction
from pathlib import Path
from typing import ClassVar

import av
import httpx
import numpy as np
import torch
from PIL import Image

TINY_MODEL = "fer-tiny"
INDEX_BITS = 12  # frame index written as 12 black/white cells, robust to lossy codecs
POLL_S = 0.05


# ---- waiting with a deadline ----------------------------------------------------------------------
def wait_until(check: Callable[[], object], what: str, seconds: float = 60.0, every: float = POLL_S):
    """Calls `check` until it returns something true, and returns that; fails naming `what` once
    `seconds` have passed. A test waits on a state, never for a fixed time."""
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {seconds:g} s")
        time.sleep(every)


async def until(check: Callable[[], object], what: str, seconds: float = 60.0, every: float = POLL_S):
    """`wait_until` inside an event loop: `check` may be a coroutine function."""
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {seconds:g} s")
        await asyncio.sleep(every)


def run_bounded(coro: Coroutine, seconds: float = 60.0):
    """`asyncio.run` with a deadline: a test that waits on the app's state fails instead of hanging."""
    return asyncio.run(asyncio.wait_for(coro, seconds))


def wait_ready(client) -> None:
    """Polls /readyz of a (TestClient) app until the background load is done; fails if it never is."""
    try:
        wait_until(lambda: client.get("/readyz").status_code == 200, "the app's readiness")
    except AssertionError:
        raise AssertionError(f"never ready: {client.get('/readyz').json()}") from None


@asynccontextmanager
async def serving(app):
    """The app's lifespan plus an async client, once it is ready: for tests that need requests in
    flight together."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:

            async def ready() -> bool:
                return (await client.get("/readyz")).status_code == 200

            await until(ready, "the app's readiness")
            yield client


async def asgi_request(
    app, request: httpx.Request, leave: Callable[[], Awaitable[object]] | None = None
) -> list[dict]:
    """`request` straight through the ASGI `app`, as a server would pass it: its body in one message,
    then, once `leave()` returns, the client's disconnect (never, without `leave`). Returns the messages
    the app sent; a test that needs the client to leave midway uses this rather than a client library,
    which cannot leave between two steps of the app."""
    body = request.read()
    delivered = False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await (leave() if leave is not None else asyncio.Event().wait())
        return {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    path = request.url.path
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": request.url.query,
        "root_path": "",
        "server": ("test", 80),
        "client": ("127.0.0.1", 1),
        "headers": [(k.lower().encode(), v.encode()) for k, v in request.headers.items()],
    }
    await app(scope, receive, send)
    return sent


# ---- the service in this process ------------------------------------------------------------------
def service_settings(**overrides):
    """The service's settings for tests: the CPU, a short batch wait, the Haar detector (it finds
    `two_faces`' faces without downloading anything)."""
    from service.settings import ServiceSettings

    return ServiceSettings(**{"device": "cpu", "max_wait_ms": 5, "face_detector": "haar", **overrides})


def post_image(client, data: bytes, **fields):
    return client.post("/predict", files={"file": ("x.png", data, "image/png")}, data=fields)


# ---- a `fer serve` process ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def fer_serve(
    env: dict, *args: str, ready_path: str = "/readyz"
) -> Iterator[tuple[httpx.Client, subprocess.Popen]]:
    """`fer serve` in a subprocess on a free loopback port, with `env` over this process's environment;
    yields (httpx client, process) once `ready_path` answers 200, and fails if it never does."""
    port = free_port()
    command = [sys.executable, "-m", "cli.main", "serve", "--port", str(port), "--log-level", "warning"]
    command += args
    server = subprocess.Popen(command, env={**os.environ, **env})
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:

            def ready() -> bool:
                assert server.poll() is None, "fer serve exited"
                try:
                    return http.get(ready_path).status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(ready, f"fer serve's {ready_path} answering 200", seconds=300, every=0.2)
            yield http, server
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(30)


# ---- the tiny model -------------------------------------------------------------------------------
def tiny_settings(clip_path: Path, projection_path: Path | str, **fields):
    """ModelSettings for the tiny model files on the CPU, exp-clip preprocessing (`fields` override;
    FER_DTYPE from the environment unless given). `projection_path` may be "none"."""
    from model.settings import ModelSettings

    defaults = {"preprocess": "exp-clip", "device": "cpu"}
    return ModelSettings(
        clip_model=TINY_MODEL,
        clip_weights=str(clip_path),
        projection=str(projection_path),
        **defaults | fields,
    )


def encode_images(engine, images) -> torch.Tensor:
    """Projected features of whole images, through the pipeline's prepare and direct-encode stages."""
    from model.pipeline import encode_in_batches

    return encode_in_batches(engine.encode_pixels, engine.prepare_many(images), 64)


def encode_clip(engine, frames) -> torch.Tensor:
    """A clip's pooled feature from its frames."""
    from model.pipeline import pool

    return pool(encode_images(engine, frames))


class DeviceFeatures(torch.Tensor):
    """Stands for a tensor on a GPU (none here): records the threads that copy it to the CPU."""

    copied_in: ClassVar[list[str]] = []

    def cpu(self, *args, **kwargs):
        DeviceFeatures.copied_in.append(threading.current_thread().name)
        return self.as_subclass(torch.Tensor).clone()


# ---- synthetic inputs -----------------------------------------------------------------------------
def face_image(seed: int = 0, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A random colour image; content does not matter to a random model, determinism does."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def index_frame(index: int, size: int = 64) -> np.ndarray:
    """An RGB frame whose pixels spell `index` in binary: one 16x16 cell per bit."""
    frame = np.zeros((size, size, 3), dtype=np.uint8)
    cell = size // 4
    for bit in range(INDEX_BITS):
        if index >> bit & 1:
            row, col = divmod(bit, 4)
            frame[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell] = 255
    return frame


def read_index(image: Image.Image) -> int:
    pixels = np.asarray(image.convert("L").resize((64, 64)), dtype=np.float32)
    value = 0
    for bit in range(INDEX_BITS):
        row, col = divmod(bit, 4)
        if pixels[row * 16 + 4 : row * 16 + 12, col * 16 + 4 : col * 16 + 12].mean() > 127:
            value |= 1 << bit
    return value


def make_video(
    path: Path,
    n_frames: int,
    *,
    fps: int = 25,
    codec: str = "libx264",
    gop: int = 25,
    size: int = 64,
    draw: Callable[[int, int], np.ndarray] = index_frame,
) -> Path:
    """A clip whose frame i is `draw(i, size)`: by default i in binary (see `index_frame`)."""
    pix_fmt = {"gif": "rgb8", "mpeg4": "yuv420p"}.get(codec, "yuv420p")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps, 1))
        stream.width = stream.height = size
        stream.pix_fmt = pix_fmt
        if codec not in ("gif",):
            stream.codec_context.gop_size = gop
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "18"}
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(draw(i, size), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def people_walks(scene: str, person) -> list:
    """The people of a test clip (model.faces.synthetic's `Walk`s, for `people_clip`), `person` recoloured
    into each: paths as fractions of a 960x540 frame; a later walk passes in front of an earlier one."""
    from model.faces.synthetic import Walk, recoloured

    a, b, c = (recoloured(person, look) for look in range(3))
    return {
        "sizes swap": [
            Walk(a, (0.3, 0.5), (0.35, 0.5), (0.07, 0.16)),
            Walk(b, (0.7, 0.5), (0.65, 0.5), (0.16, 0.07)),
        ],
        "one enters late": [
            Walk(a, (0.25, 0.45), (0.3, 0.5), (0.1, 0.1)),
            Walk(b, (0.75, 0.5), (0.7, 0.45), (0.12, 0.12)),
            Walk(c, (0.5, 0.3), (0.5, 0.7), (0.09, 0.09), shown=(0.45, 1.0)),
        ],
        "two cross": [
            Walk(a, (0.12, 0.4), (0.88, 0.4), (0.1, 0.1)),
            Walk(b, (0.88, 0.6), (0.12, 0.6), (0.1, 0.1), mirror=True),
        ],
        "one passes behind": [
            Walk(b, (0.05, 0.5), (0.95, 0.5), (0.065, 0.065)),
            Walk(a, (0.5, 0.5), (0.5, 0.5), (0.1, 0.1)),
        ],
    }[scene]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def two_faces() -> tuple[bytes, list[list[int]]]:
    """The astronaut photo (a real face shipped with scikit-image) pasted twice at known places: PNG
    bytes and each face's expected [x, y, side], largest first."""
    from skimage import data as skimage_data

    face = Image.fromarray(skimage_data.astronaut())
    canvas = Image.new("RGB", (1000, 560), "gray")
    canvas.paste(face.resize((420, 420)), (20, 60))
    canvas.paste(face.resize((500, 500)), (480, 30))
    # astronaut's face is near (177, 67, 93, 93) in the 512 px original
    expected = [
        [480 + 177 * 500 // 512, 30 + 67 * 500 // 512, 91],
        [20 + 177 * 420 // 512, 60 + 67 * 420 // 512, 76],
    ]
    return png(canvas), expected


class ThreadRecordingDetector:
    """A face detector that finds nothing and records the name of each thread that searched a frame."""

    name = "recording"

    def __init__(self):
        self.threads: list[str] = []

    def detect(self, image, max_faces, long_side=None):
        self.threads.append(threading.current_thread().name)
        return []
