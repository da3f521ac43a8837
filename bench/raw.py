"""The limit: the engine's image encoder (+ projection) alone, in this process, on ready uint8 pixels
(no HTTP, no decoding, no queueing), and the CPU half of a request (the pipeline's prepare stage on
the benchmark JPEG), timed apart so the single-request latency target can compare against both."""

from __future__ import annotations

import io
import statistics
import time

import torch

from model.engine import FerEngine
from model.options import PipelineOptions
from model.pipeline import prepare_image


def _synchronize(engine: FerEngine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def encoder_speed(engine: FerEngine, batch: int, min_seconds: float, min_calls: int = 5) -> dict:
    """Images/s of `encode_pixels` at one batch size, after warm-up calls (allocator, kernels)."""
    size = engine.image_size
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
    for _ in range(3):
        engine.encode_pixels(pixels)
    _synchronize(engine)
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_seconds:
        engine.encode_pixels(pixels)
        calls += 1
    _synchronize(engine)  # CUDA runs asynchronously: the queued calls count once they have finished
    seconds = time.perf_counter() - start
    return {"batch": batch, "images_per_s": batch * calls / seconds, "ms_per_call": 1000 * seconds / calls}


def prepare_ms(engine: FerEngine, jpeg: bytes, repeats: int = 30) -> float:
    """Median ms of the prepare stage (decode + resize to the encoder's uint8 input, no face detection,
    as the benchmark's requests ask)."""
    options = PipelineOptions(detect_faces=False)
    samples = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        prepare_image(io.BytesIO(jpeg), engine.prepare_many, None, options)
        samples.append(1000 * (time.perf_counter() - start))
    return statistics.median(samples[1:])  # the first call pays for imports and caches
