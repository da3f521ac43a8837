"""`python -m bench.abuse [--quick] [--model vit-b-32|demo] [--api-key KEY] [--out FILE.json]`: a victim's
/predict latency while each attack runs, on loopback.

The victim sends ordinary `POST /predict` requests (bench.inputs' 640x480 JPEG with a face) at a steady
pace, one at a time, each on a fresh connection. It runs first with no attack (the baseline), then
beside each attack: decode bombs, a /predict-video flood, a /retrieve text flood, misbehaving
connections, uploads that disconnect midway, a flood of uploads larger than the service receives at a
time, silent uploads that declare the whole upload budget, and a video whose frames grow past the frame
limit. Every attack is bounded in count and time, targets 127.0.0.1 only and closes every socket it
opened when its window ends (the upload flood waits past the window for its answers, up to a timeout).

Each scenario gets a fresh `fer serve` (stopped right after it), so one attack's aftermath cannot skew the
next. A scenario: the attack starts, the victim joins after a short ramp, both stop at the window's end;
then victim probes show whether the service recovered, and its RSS and open file descriptors are read.
The service's RSS is also read every tenth of a second from the window's start, for its peak.

Targets (per attack, reported, never an exit code): the victim's worst latency <= 5 s and >= 90% of its
requests succeed; and an attack's own, on what its requests got (`attack(targets=...)`): every request
an HTTP status, every 429 and 503 a Retry-After, a refusal for what is over a limit, RSS bounded. Prints
the JSON report on stdout (and to --out, rewritten after each scenario with `complete` false until the
end) and a table on stderr. Exit code 1 when a scenario could not be measured (it failed, or the
baseline got no answer).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import signal
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from urllib.parse import urlsplit

import av
import httpx
import numpy as np

from bench.inputs import cached_clip, face_gif, face_jpeg
from bench.load import LOOPBACK_HOST, Upload, check_loopback
from bench.report import fmt, target, target_line
from bench.run import git_commit, model_env, run_reported
from bench.server import Service, process_tree
from model.synthetic_media import size_changing_clip

log = logging.getLogger("bench.abuse")

TARGET_WORST_LATENCY_S = 5.0
TARGET_SUCCESS_SHARE = 0.9
# RSS a service may gain while refusing the size-changing video: room for several frames at the frame
# limit (~27 MB each in RGB at FER_MAX_VIDEO_PIXELS' default), and far below one of the clip's
# 12000x12000 frames decoded (~410 MB in RGB).
TARGET_RSS_GROWTH_MB = 256.0
CONNECT_TIMEOUT_S = 5.0
MB = 2**20


@dataclass(frozen=True)
class Plan:
    """How long each scenario runs, and the inputs' sizes: seconds for CI's smoke run (`quick`)."""

    quick: bool  # each attack's sizes: its `quick` ones (see `attack`)
    window_s: float  # each scenario's, the baseline's included
    ramp_s: float  # the attack runs alone this long before the victim starts
    victim_rate_per_s: float
    victim_timeout_s: float
    recovery_s: float  # the longest the recovery probes go on
    mp4_bomb: tuple[int, int, int]  # frames, width, height
    clip: tuple[float, int]  # seconds, height: the video flood's clip


FULL_PLAN = Plan(
    quick=False, window_s=30.0, ramp_s=2.0, victim_rate_per_s=2.0, victim_timeout_s=15.0, recovery_s=30.0,
    mp4_bomb=(6000, 1280, 720), clip=(10, 360),
)  # fmt: skip
QUICK_PLAN = Plan(
    quick=True, window_s=4.0, ramp_s=0.5, victim_rate_per_s=2.0, victim_timeout_s=6.0, recovery_s=5.0,
    mp4_bomb=(3000, 320, 240), clip=(4, 240),
)  # fmt: skip


# ---- inputs ------------------------------------------------------------------------------------------------
def gif_canvas_bomb(width: int = 3000, height: int = 3000, frames: int = 20_000) -> bytes:
    """An animated GIF whose frames are each one pixel of a `width` x `height` canvas, written block by
    block (Pillow would diff whole canvases): a few hundred KB that cost a decoder `frames` compositions
    of the whole canvas."""
    out = bytearray(b"GIF89a" + struct.pack("<HHBBB", width, height, 0xF1, 0, 0))  # 4-colour global table
    out += bytes([0, 0, 0, 255, 255, 255, 255, 0, 0, 0, 0, 255])
    out += b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"  # loop forever, as animations do
    for i in range(frames):
        out += b"\x21\xf9\x04\x04\x02\x00\x00\x00"  # leave in place, 20 ms (some decoders stretch 0 ms)
        out += b"\x2c" + struct.pack("<HHHHB", (i * 37) % width, (i * 101) % height, 1, 1, 0)
        code = 4 | ((1 + i % 3) << 3) | (5 << 6)  # LZW, 3-bit codes: clear, the pixel's colour, end
        out += bytes([2, 2, code & 0xFF, code >> 8, 0])
    return bytes(out + b"\x3b")


def keyframe_mp4_bomb(path: Path, frames: int, width: int, height: int, fps: int = 25) -> Path:
    """An H.264 mp4 of `frames` frames with a single key frame: a decoder that seeks to each sampled frame
    lands on frame 0 every time and decodes forward again."""
    cycle = []
    for k in range(fps):  # a moving patch on a flat background: frames differ, and the file stays small
        pixels = np.full((height, width, 3), 128, np.uint8)
        x = k * max(0, width - 16) // fps
        pixels[:16, x : x + 16] = 255
        cycle.append(av.VideoFrame.from_ndarray(pixels, format="rgb24").reformat(format="yuv420p"))
    keyint = frames + 1  # past the end, and no scene cuts: frame 0 is the only key frame
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = keyint
        stream.options = {"preset": "ultrafast", "x264-params": f"keyint={keyint}:scenecut=0"}
        for i in range(frames):
            frame = cycle[i % fps]
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def cached_mp4_bomb(cache_dir: Path, frames: int, width: int, height: int) -> bytes:
    """`keyframe_mp4_bomb` once per size, since a large one takes a while to encode."""
    path = cache_dir / f"abuse-bomb-{frames}f-{width}x{height}.mp4"
    if not path.is_file():
        log.info("encoding a one-key-frame mp4 into %s (cached for later runs)", path)
        partial = path.with_suffix(f".{os.getpid()}.partial.mp4")
        keyframe_mp4_bomb(partial, frames, width, height).replace(path)
    return path.read_bytes()


def descriptions(script: str, count: int = 512, chars: int = 1000) -> list[str]:
    """`count` distinct descriptions of `chars` characters (the documented maximum), Latin or CJK; a CJK
    character is three bytes in UTF-8, so the same texts make three times the upload."""
    if script == "cjk":
        return ["".join(chr(0x4E00 + (i * chars + k) % 0x5000) for k in range(chars)) for i in range(count)]
    filler = "a person smiles widely while the eyebrows lift and the mouth opens " * (chars // 60 + 1)
    return [f"{i}: {filler}"[: chars - 1] + "." for i in range(count)]  # no trailing space to strip


# A 64x64 stream whose later frames are 144 MP each, 15 times FER_MAX_VIDEO_PIXELS' default; ~21 MB.
SIZE_CHANGING_FRAMES = [(64, 64)] + [(12000, 12000)] * 10


@dataclass(frozen=True)
class Inputs:
    jpeg: bytes  # the victim's
    gif_bomb: bytes
    mp4_bomb: bytes
    clip: bytes  # the video flood's
    gif: bytes  # the upload flood's: an ordinary animated GIF of ~2.8 MB
    size_changing_clip: bytes


def make_inputs(plan: Plan, cache_dir: Path) -> Inputs:
    cache_dir.mkdir(parents=True, exist_ok=True)
    clip = cached_clip(cache_dir, *plan.clip).read_bytes()
    return Inputs(
        face_jpeg(), gif_canvas_bomb(), cached_mp4_bomb(cache_dir, *plan.mp4_bomb), clip, face_gif(),
        size_changing_clip(SIZE_CHANGING_FRAMES),
    )  # fmt: skip


# ---- the service under attack ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """The service: only ever on 127.0.0.1; every request carries `headers` (a Service's: its API key,
    when it has one)."""

    base_url: str
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_loopback(self.base_url)

    def head(self, method: str, path: str, content_type: str = "", length: int | None = None) -> bytes:
        """A request's head, for the clients that misbehave below HTTP libraries."""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {urlsplit(self.base_url).netloc}"]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        lines += [f"Content-Type: {content_type}"] if content_type else []
        lines += [f"Content-Length: {length}"] if length is not None else []
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            return await asyncio.open_connection(LOOPBACK_HOST, urlsplit(self.base_url).port)


BOUNDARY = "abuse-boundary-0123456789"
UPLOAD_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
PART_START = (
    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n'
    "Content-Type: image/jpeg\r\n\r\n\xff\xd8"
).encode("latin-1")


def upload_head(target: Target, length: int) -> bytes:
    """A /predict upload's head announcing a `length`-byte body, and that body's first bytes."""
    return target.head("POST", "/predict", UPLOAD_TYPE, length) + PART_START


# ---- the attacks: each returns the attacker's outcomes, counted --------------------------------------------
@dataclass(frozen=True)
class Attack:
    """A scenario's attacker: `run(target, inputs, until, **sizes)`, with `full` sizes in the benchmark
    and `quick` ones in the smoke run; `targets` judge the scenario's row (its attacker's outcomes, the
    service's readings), beside the victim's targets that every scenario has."""

    run: Callable[..., Awaitable[Counter]]
    full: dict
    quick: dict
    targets: tuple[Callable[[dict], dict], ...] = ()

    def sizes(self, plan: Plan) -> dict:
        return self.quick if plan.quick else self.full


ATTACKS: dict[str, Attack] = {}  # the scenarios, in the order they run


def attack(*, full: dict, quick: dict, targets: tuple[Callable[[dict], dict], ...] = ()):
    """Makes the decorated coroutine function a scenario, under its name: a new scenario is one function."""

    def register(run: Callable[..., Awaitable[Counter]]):
        ATTACKS[run.__name__] = Attack(run, full, quick, targets)
        return run

    return register


# ---- an attack's own targets: each takes the scenario's row ({} when it failed) ----------------------------
NO_RETRY_AFTER = "without Retry-After"


def has_status(label: str) -> bool:
    return label.split(" ", 1)[0].isdigit()


def _attacker_count(row: dict, counts: Callable[[str], bool]) -> int | None:
    """The attacker's requests whose outcome `counts`; none sent measures nothing."""
    attacker = row.get("attacker")
    return sum(n for label, n in attacker.items() if counts(label)) if attacker else None


def every_request_answered(row: dict) -> dict:
    value = _attacker_count(row, lambda label: not has_status(label))
    return target("attacker_requests_without_status", value, "<=", 0,
                  "the attacker's requests that got no HTTP status (a connection error, a timeout)")  # fmt: skip


def refusals_say_when(row: dict) -> dict:
    value = _attacker_count(row, lambda label: label.endswith(NO_RETRY_AFTER))
    return target("refusals_without_retry_after", value, "<=", 0,
                  "429 and 503 answers to the attacker without a Retry-After")  # fmt: skip


def refused_as_too_large(row: dict) -> dict:
    attacker = row.get("attacker") or {}
    sent = sum(attacker.values())
    value = attacker.get("413 media_too_large", 0) / sent if sent else None
    return target("attacker_refused_media_too_large", value, ">=", 1.0,
                  "the attacker's requests answered 413 media_too_large")  # fmt: skip


def memory_bounded(row: dict) -> dict:
    service = row.get("service") or {}
    start, peak = service.get("start_rss_mb"), service.get("peak_rss_mb")
    value = None if start is None or peak is None else peak - start
    return target("service_rss_growth_mb", value, "<=", TARGET_RSS_GROWTH_MB,
                  "the service's peak RSS over its RSS at the window's start, in MB")  # fmt: skip


def answer_label(answer: httpx.Response) -> str:
    """An answer as an outcome: its status and error code (`413 media_too_large`); a 429 or 503, which
    ask the client to come back, without a Retry-After saying when is marked so."""
    label = str(answer.status_code)
    if answer.status_code >= 400:
        try:
            body = answer.json()
        except ValueError:  # not JSON: a proxy's or the HTTP server's own page
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            label += f" {body['error']}"
    if answer.status_code in (429, 503) and "retry-after" not in answer.headers:
        label += f" {NO_RETRY_AFTER}"
    return label


async def flood(target: Target, uploads: list[Upload], until: float, *, clients: int, per_client: int,
                timeout_s: float) -> Counter:  # fmt: skip
    """`clients` clients at once, each sending `per_client` of `uploads` in turn (client i from the i-th);
    a request gives up after `timeout_s`, and one still in flight at `until` is abandoned."""
    outcomes: Counter = Counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=target.base_url, headers=target.headers, limits=limits, timeout=timeout_s
    ) as client:

        async def one(i: int) -> None:
            for j in range(per_client):
                upload = uploads[(i + j) % len(uploads)]
                try:
                    answer = await client.post(
                        upload.path, content=upload.body, headers={"content-type": upload.content_type}
                    )
                    outcomes[answer_label(answer)] += 1
                except httpx.HTTPError as exc:
                    outcomes[type(exc).__name__] += 1
                except asyncio.CancelledError:
                    outcomes["abandoned"] += 1
                    raise

        tasks = [asyncio.create_task(one(i)) for i in range(clients)]
        await asyncio.wait(tasks, timeout=max(0.0, until - time.monotonic()))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return outcomes


RETRIEVE_FIELDS = {"descriptions": '["smiles", "frowns"]'}


@attack(
    full={"clients": 3, "per_client": 6, "timeout_s": 10.0},
    quick={"clients": 2, "per_client": 3, "timeout_s": 3.0},
)
async def decode_bombs(target: Target, inputs: Inputs, until: float, **sizes) -> Counter:
    """The GIF canvas bomb and the one-key-frame MP4, each to /predict, /predict-video and /retrieve."""
    bombs = (("bomb.gif", inputs.gif_bomb, "image/gif"), ("bomb.mp4", inputs.mp4_bomb, "video/mp4"))
    uploads = [
        Upload.multipart(path, name, data, media_type, RETRIEVE_FIELDS if path == "/retrieve" else None)
        for name, data, media_type in bombs
        for path in ("/predict", "/predict-video", "/retrieve")
    ]
    return await flood(target, uploads, until, **sizes)


@attack(
    full={"clients": 150, "per_client": 2},
    quick={"clients": 40, "per_client": 2},
    targets=(refusals_say_when,),
)
async def video_flood(target: Target, inputs: Inputs, until: float, **sizes) -> Counter:
    """Many ordinary short clips to /predict-video at once."""
    upload = Upload.multipart("/predict-video", "clip.mp4", inputs.clip, "video/mp4")
    return await flood(target, [upload], until, timeout_s=until - time.monotonic(), **sizes)


@attack(
    full={"clients": 3, "per_client": 10}, quick={"clients": 2, "per_client": 5}, targets=(refusals_say_when,)
)
async def text_flood(target: Target, inputs: Inputs, until: float, **sizes) -> Counter:
    """/retrieve with 512 descriptions of 1,000 characters, Latin and CJK in turn."""
    uploads = [
        Upload.multipart(
            "/retrieve", "face.jpg", inputs.jpeg, "image/jpeg",
            {"descriptions": json.dumps(descriptions(script), ensure_ascii=False)},
        )
        for script in ("latin", "cjk")
    ]  # fmt: skip
    return await flood(target, uploads, until, timeout_s=until - time.monotonic(), **sizes)


async def hold(target: Target, first: bytes, rest: bytes, step: int, interval_s: float, until: float) -> str:
    """One connection that sends `first`, then `rest` `step` bytes every `interval_s`, held open until
    `until`; how it ended: the server's status, "closed", "reset" or "held" (open to the end)."""
    try:
        reader, writer = await target.connect()
    except OSError as exc:
        return type(exc).__name__

    async def feed() -> None:
        writer.write(first)
        view = memoryview(rest)  # slices without copies: held uploads and huge headers are megabytes
        for i in range(0, len(rest), step):
            await asyncio.sleep(interval_s)
            writer.write(view[i : i + step])
            await writer.drain()

    feeding = asyncio.create_task(feed())
    try:
        async with asyncio.timeout(max(0.0, until - time.monotonic())):
            line = await reader.readline()
        status = line.split()[1:2]
        return status[0].decode("latin-1") if status else "closed"
    except TimeoutError:
        return "held"
    except (OSError, ValueError):  # ValueError: an answer line over the reader's limit
        return "reset"
    finally:
        feeding.cancel()
        await asyncio.gather(feeding, return_exceptions=True)
        writer.transport.abort()


@attack(
    full={"idle": 300, "slowloris": 50, "slow_bodies": 20, "held_uploads": 4, "held_upload_mb": 30,
          "huge_headers": 4, "huge_header_mb": 16, "interval_s": 1.0},
    quick={"idle": 100, "slowloris": 10, "slow_bodies": 5, "held_uploads": 2, "held_upload_mb": 4,
           "huge_headers": 2, "huge_header_mb": 4, "interval_s": 0.5},
)  # fmt: skip
async def connections(target: Target, inputs: Inputs, until: float, *, idle: int, slowloris: int,
                      slow_bodies: int, held_uploads: int, held_upload_mb: float, huge_headers: int,
                      huge_header_mb: float, interval_s: float) -> Counter:  # fmt: skip
    """Connections opened together and held for the window: idle ones; slowloris (headers a byte at a
    time); slow bodies (a 1 MB upload 1 KB at a time); held uploads (all but the last KB at once); and
    one unterminated header of `huge_header_mb`."""
    unfinished_head = target.head("POST", "/predict")[:-2]  # without the blank line that ends a head
    slow_headers = b"".join(f"X-Slow-{n}: {n}\r\n".encode() for n in range(1000))
    held = int(held_upload_mb * MB)
    kinds = [
        (idle, b"", b"", 1, 0.0),
        (slowloris, unfinished_head, slow_headers, 1, interval_s),
        (slow_bodies, upload_head(target, MB), bytes(MB - len(PART_START)), 1024, interval_s),
        (held_uploads, upload_head(target, held), bytes(held - len(PART_START) - 1024), MB, 0.0),
        (huge_headers, target.head("GET", "/livez")[:-2] + b"X-Filler: ", b"a" * int(huge_header_mb * MB),
         MB, 0.0),
    ]  # fmt: skip
    ends = await asyncio.gather(*(hold(target, *kind, until) for count, *kind in kinds for _ in range(count)))
    return Counter(ends)


@attack(full={"uploads": 120, "body_mb": 4}, quick={"uploads": 20, "body_mb": 1})
async def disconnects(
    target: Target, inputs: Inputs, until: float, *, uploads: int, body_mb: float
) -> Counter:
    """`uploads` /predict uploads spread over the window (on loopback they would all be done at once),
    each dropped with a reset after 10-90% of its body, as a crashed client's."""
    length = int(body_mb * MB)
    body = bytes(length)
    outcomes: Counter = Counter()
    start = time.monotonic()
    spacing = (until - start) / uploads
    for i in range(uploads):
        await asyncio.sleep(max(0.0, start + i * spacing - time.monotonic()))
        writer = None
        try:
            async with asyncio.timeout(max(0.001, until - time.monotonic())):
                _, writer = await target.connect()
                writer.write(upload_head(target, length) + body[: length * (1 + i % 9) // 10])
                await writer.drain()
            outcomes["dropped"] += 1
        except OSError as exc:  # TimeoutError included
            outcomes[type(exc).__name__] += 1
        finally:
            if writer is not None:
                writer.transport.abort()
    return outcomes


@attack(
    full={"clients": 150, "frames": 64, "detect_faces": True, "timeout_s": 120.0},
    quick={"clients": 150, "frames": 64, "detect_faces": False, "timeout_s": 60.0},
    targets=(every_request_answered, refusals_say_when),
)
async def upload_flood(target: Target, inputs: Inputs, until: float, *, clients: int, frames: int,
                       detect_faces: bool, timeout_s: float) -> Counter:  # fmt: skip
    """`clients` clients post the ~2.8 MB GIF to /predict-video (`frames` sampled) at once, once each:
    more than the upload budget (FER_MAX_UPLOADS_MB), so many are refused while still sending, and more
    than the video queue admits. Each waits for its answer past the window, up to `timeout_s`: a refusal
    must reach the client as a status, not as a reset connection. (The smoke run skips face detection,
    which makes the admitted requests' work short; the uploads are the same.)"""
    fields = {"frames": str(frames), "detect_faces": str(detect_faces).lower()}
    upload = Upload.multipart("/predict-video", "face.gif", inputs.gif, "image/gif", fields)
    return await flood(target, [upload], time.monotonic() + timeout_s, clients=clients, per_client=1,
                       timeout_s=timeout_s)  # fmt: skip


@attack(full={"silent": 4, "declared_mb": 50}, quick={"silent": 4, "declared_mb": 50})
async def silent_lockout(target: Target, inputs: Inputs, until: float, *, silent: int,
                         declared_mb: float) -> Counter:  # fmt: skip
    """`silent` /predict uploads, each declaring `declared_mb` (together the default upload budget, each
    the largest upload) and sending nothing after its head, held open for the window: a declaration
    costs the client nothing, so it must not shut the victim's uploads out."""
    head = target.head("POST", "/predict", UPLOAD_TYPE, int(declared_mb * MB))
    return Counter(await asyncio.gather(*(hold(target, head, b"", 1, 0.0, until) for _ in range(silent))))


@attack(
    full={"clients": 2, "per_client": 10},
    quick={"clients": 1, "per_client": 2},
    targets=(refused_as_too_large, memory_bounded, refusals_say_when),
)
async def size_changing_video(target: Target, inputs: Inputs, until: float, **sizes) -> Counter:
    """A clip whose stream declares 64x64 while its later frames are 12000x12000 (an MJPEG in MKV; a
    new H.264 SPS does the same), to /predict-video: refused as too large, before its frames are
    decoded at their real size."""
    upload = Upload.multipart("/predict-video", "clip.mkv", inputs.size_changing_clip, "video/x-matroska")
    return await flood(target, [upload], until, timeout_s=until - time.monotonic(), **sizes)


# ---- the victim --------------------------------------------------------------------------------------------
class Victim:
    """An ordinary client: `POST /predict`, one request at a time, each on a fresh connection (so a
    connection cap or a full accept queue shows); latency is the whole wait, failed or not."""

    def __init__(self, target: Target, jpeg: bytes, timeout_s: float):
        self.upload = Upload.multipart("/predict", "face.jpg", jpeg, "image/jpeg")
        self.client = httpx.Client(
            base_url=target.base_url,
            headers={**target.headers, "content-type": self.upload.content_type},
            timeout=timeout_s,
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    def ask(self) -> tuple[str, float]:
        """One request: its status (or what went wrong) and its latency."""
        start = time.perf_counter()
        try:
            label = str(self.client.post(self.upload.path, content=self.upload.body).status_code)
        except httpx.HTTPError as exc:
            label = type(exc).__name__
        return label, time.perf_counter() - start

    def run(self, start_at: float, until: float, rate_per_s: float) -> list[tuple[str, float]]:
        """Requests `rate_per_s` a second from `start_at` to `until`; a late answer delays the next
        request rather than piling them up."""
        answers, next_at = [], start_at
        while True:
            time.sleep(max(0.0, next_at - time.monotonic()))
            if time.monotonic() >= until:
                return answers
            answers.append(self.ask())
            next_at = max(next_at + 1 / rate_per_s, time.monotonic())

    def recover(self, limit_s: float) -> dict:
        """Requests every half second until one succeeds within the latency target, or `limit_s`."""
        start, probes = time.monotonic(), 0
        while True:
            label, seconds = self.ask()
            probes += 1
            if label == "200" and seconds <= TARGET_WORST_LATENCY_S:
                return {"recovered": True, "after_s": time.monotonic() - start, "probes": probes}
            if time.monotonic() - start >= limit_s:
                return {"recovered": False, "after_s": None, "probes": probes}
            time.sleep(0.5)


def summarise_victim(answers: list[tuple[str, float]]) -> dict:
    """Requests, success share and latency quantiles over every request (a timeout counts its whole wait)."""
    ms = [1000 * seconds for _, seconds in answers]
    ok = sum(label == "200" for label, _ in answers)
    quantile = {f"{name}_ms": float(np.percentile(ms, q)) if ms else None for name, q in
                (("p50", 50), ("p95", 95), ("max", 100))}  # fmt: skip
    return {
        "requests": len(answers),
        "ok": ok,
        "success_share": ok / len(answers) if answers else None,
        **quantile,
        "outcomes": dict(Counter(label for label, _ in answers)),
    }


# ---- one scenario ------------------------------------------------------------------------------------------
def watch_rss(service: Service, stop: threading.Event, every_s: float = 0.1) -> None:
    """Reads the service's RSS until `stop`, so that its peak (`Service.peak_rss_mb`) is seen."""
    while not stop.wait(every_s):
        service.rss_mb()


def run_scenario(name: str, service: Service, inputs: Inputs, plan: Plan) -> dict:
    """The attack `name` (none for the baseline) with the victim beside it, then the recovery probes and
    the service's readings."""
    result: dict = {"name": name}
    try:
        target = Target(service.base_url, service.headers)
        victim = Victim(target, inputs.jpeg, plan.victim_timeout_s)
        with victim.client:
            if "200" not in [victim.ask()[0] for _ in range(2)]:  # also pays for first-call allocations
                raise RuntimeError(f"no warm-up request succeeded; service log:\n{service.log_tail()}")
            start_rss_mb = service.rss_mb()
            start = time.monotonic()
            until = start + plan.window_s
            # The victim's own thread: the attackers' busy event loop adds nothing to its latencies.
            with ThreadPoolExecutor(2) as pool:
                attacked = threading.Event()
                pool.submit(watch_rss, service, attacked)
                try:
                    answers = pool.submit(victim.run, start + plan.ramp_s, until, plan.victim_rate_per_s)
                    if name in ATTACKS:
                        attacker = ATTACKS[name]
                        attacking = attacker.run(target, inputs, until, **attacker.sizes(plan))
                        result["attacker"] = dict(asyncio.run(attacking))
                    result["victim"] = summarise_victim(answers.result())
                finally:
                    attacked.set()
            result["recovery"] = victim.recover(plan.recovery_s)
        fds = sum(p.num_fds() for p in process_tree(service.process.pid))
        result["service"] = {
            "rss_mb": service.rss_mb(), "start_rss_mb": start_rss_mb, "peak_rss_mb": service.peak_rss_mb,
            "fds": fds,
        }  # fmt: skip
    except Exception as exc:
        log.exception("the scenario %s failed", name)
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


# ---- the report --------------------------------------------------------------------------------------------
def evaluate_targets(attacks: list[dict]) -> list[dict]:
    """Per attack, the victim's worst latency and success share, then the attack's own targets, as
    bench.report's targets; a missing figure (no victim request, a scenario that failed) is not a pass."""
    targets = []
    for row in attacks:
        measured = {} if "error" in row else row
        victim = measured.get("victim") or {}
        worst = victim.get("max_ms")
        worst_s = None if worst is None else worst / 1000
        own = ATTACKS[row["name"]].targets if row["name"] in ATTACKS else ()
        for t in (
            target("victim_worst_latency_s", worst_s, "<=", TARGET_WORST_LATENCY_S, "the victim's slowest request"),
            target("victim_success_share", victim.get("success_share"), ">=", TARGET_SUCCESS_SHARE,
                   "the victim's requests answered 200"),
            *(judge(measured) for judge in own),
        ):  # fmt: skip
            targets.append({"attack": row["name"], **t})
    return targets


ROW = "{:<19} {:>5} {:>5} {:>7} {:>7} {:>7} {:>10} {:>7} {:>7} {:>5}  {}"
HEADINGS = ("scenario", "sent", "ok", "p50 ms", "p95 ms", "max ms", "recovered", "RSS MB", "peak MB", "fds",
            "attacker")  # fmt: skip


def format_table(report: dict) -> str:
    settings, machine = report["settings"], report["machine"]
    lines = [
        f"abuse run: {settings['model']}, {machine['cpus']} CPUs, commit {report['commit']}",
        ROW.format(*HEADINGS),
    ]
    for row in [r for r in (report["baseline"], *report["attacks"]) if r]:
        victim, service, recovery = (row.get(k) or {} for k in ("victim", "service", "recovery"))
        recovered = "-" if not recovery else f"{recovery['after_s']:.1f} s" if recovery["recovered"] else "no"
        lines.append(ROW.format(
            row["name"], victim.get("requests", 0), fmt(victim.get("success_share"), ".0%"),
            *(fmt(victim.get(f"{q}_ms"), ".0f") for q in ("p50", "p95", "max")),
            recovered, fmt(service.get("rss_mb"), ".0f"), fmt(service.get("peak_rss_mb"), ".0f"),
            service.get("fds", "-"),
            row.get("error") or json.dumps(row.get("attacker", {})),
        ))  # fmt: skip
    if report["settings"]["quick"]:
        lines.append("(--quick: a smoke run with windows of seconds; its verdicts are not the benchmark's)")
    lines += [target_line(t, f"{t['attack']} {t['name']}") for t in report.get("targets", [])]
    return "\n".join(lines)


def run_abuse(args: argparse.Namespace, checkpoint=lambda report: None) -> dict:
    """The whole run; `checkpoint(report)` gets the report after each scenario."""
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    model = args.model or ("demo" if args.quick else "vit-b-32")
    env = {**model_env(model)[0], "FER_WORKERS": "1"}  # not a FER_WORKERS from the caller's environment
    if args.api_key:
        env["FER_API_KEY"] = args.api_key
    log.info("making the inputs (decode bombs, a clip) in %s", args.cache_dir)
    inputs = make_inputs(plan, args.cache_dir)
    report: dict = {
        "benchmark": "exp-clip-fer under abuse: a victim's /predict beside each attack",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": " ".join(["python -m bench.abuse", *sys.argv[1:]]),
        "complete": False,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_start": os.getloadavg()[0],  # other work on the machine skews every figure
        },
        "settings": {
            "quick": args.quick,
            "model": model,
            "service_env": {k: "<set>" if k == "FER_API_KEY" else v for k, v in env.items()},
            "plan": {**asdict(plan), "attacks": {name: a.sizes(plan) for name, a in ATTACKS.items()}},
            "inputs_kb": {k: round(len(v) / 1024) for k, v in asdict(inputs).items()},
        },
        "baseline": None,
        "attacks": [],
    }
    for name in ["baseline", *(args.only or ATTACKS)]:
        log.info("%s: starting a fresh service", name)
        with Service(env, args.cache_dir / f"abuse-{name}.log") as service:
            result = run_scenario(name, service, inputs, plan)
        if name == "baseline":
            report["baseline"] = result
        else:
            report["attacks"].append(result)
        report["targets"] = evaluate_targets(report["attacks"])
        checkpoint(report)
    report["machine"]["load_average_at_end"] = os.getloadavg()[0]
    report["targets_met"] = all(t["passed"] for t in report["targets"])
    report["complete"] = True
    checkpoint(report)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.abuse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke run: demo model, windows of seconds")
    parser.add_argument(
        "--model", choices=("vit-b-32", "demo"), help="default: demo with --quick, else vit-b-32"
    )
    parser.add_argument("--api-key", help="FER_API_KEY for the service; every client sends it as X-API-Key")
    parser.add_argument("--only", action="append", choices=tuple(ATTACKS), help="run only this attack")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "fer-bench", help="inputs and logs"
    )
    parser.add_argument("--out", type=Path, help="also write the JSON report here, rewritten after each step")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    report = run_reported(parse_args(argv), run_abuse, format_table)
    failed = [r["name"] for r in (report["baseline"], *report["attacks"]) if "error" in r]
    if failed or not report["baseline"]["victim"]["ok"]:
        log.error("not measured: %s", ", ".join(failed) or "the baseline got no answer")
        return 1
    return 0


if __name__ == "__main__":
    # A time limit's SIGTERM unwinds like Ctrl-C: the service is stopped, not left running.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
