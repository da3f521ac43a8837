"""The limit: the engine's image encoder (+ projection) alone, in this process, on ready uint8 pixels.

This is what a perfect server would reach: no HTTP, no decoding, no queueing. The CPU half of a
request (JPEG decode + resize to uint8, the service's `prepare` stage) is timed separately so the
single-request latency target can compare against encode + decode.
"""

from __future__ import annotations

import io
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from model.engine import FerEngine
from model.options import PipelineOptions
from model.pipeline import prepare_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderSpeed:
    batch: int
    calls: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.batch * self.calls / self.seconds

    @property
    def ms_per_call(self) -> float:
        return 1000 * self.seconds / self.calls

    def as_dict(self) -> dict:
        return {**asdict(self), "images_per_s": self.images_per_s, "ms_per_call": self.ms_per_call}


def _synchronize(engine: FerEngine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def time_calls(
    call: Callable[[], object], sync: Callable[[], None], min_seconds: float, min_calls: int
) -> tuple[int, float]:
    """Repeat `call` until both `min_calls` and `min_seconds` are reached; returns (calls, seconds)."""
    sync()
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_seconds:
        call()
        calls += 1
    sync()  # CUDA runs asynchronously: the queued calls count once they have finished
    return calls, time.perf_counter() - start


def encoder_speed(
    engine: FerEngine, batch: int, min_seconds: float = 3.0, min_calls: int = 5, warmup: int = 3
) -> EncoderSpeed:
    """Images/s of `encode_pixels` at one batch size, after warm-up calls (allocator, kernels, autotune)."""
    size = engine.image_size
    pixels = torch.randint(
        0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    for _ in range(warmup):
        engine.encode_pixels(pixels)
    calls, seconds = time_calls(
        lambda: engine.encode_pixels(pixels), lambda: _synchronize(engine), min_seconds, min_calls
    )
    speed = EncoderSpeed(batch, calls, seconds)
    log.info(
        "raw encoder, batch %d: %.1f images/s (%.1f ms a call)", batch, speed.images_per_s, speed.ms_per_call
    )
    return speed


def prepare_ms(engine: FerEngine, jpeg: bytes, repeats: int = 30) -> float:
    """Median ms of the service's own prepare stage for the uploaded JPEG bytes (decode + resize to the
    encoder's uint8 input; no face detection, as the benchmark's requests ask)."""

    def prepare() -> None:
        prepare_image(io.BytesIO(jpeg), engine, None, PipelineOptions(detect_faces=False))

    prepare()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        prepare()
        samples.append(1000 * (time.perf_counter() - start))
    return statistics.median(samples)
