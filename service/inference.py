"""The request pipeline: a request's places are admitted first, then the pipeline's CPU stages run in a
decode pool (videos in their own), the encoder call goes through the shared batcher, and scoring runs
in the pool again. The stages are model.pipeline's, the same the `fer` commands call; this module only
decides where and when each one runs, and stops a decode whose client has left."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import BinaryIO

import torch

from model import pipeline
from model.options import PipelineOptions
from service.admission import Reservation
from service.batcher import ClientGone, Disconnected, wait_watched
from service.runtime import Runtime

TEXT_CHUNK = 16  # descriptions encoded per device task: image batches get a turn between chunks


@dataclass
class Clock:
    """When a request started and when its decoding ended (the response's `timing`)."""

    started: float = field(default_factory=time.perf_counter)
    decoded: float | None = None


async def _prepare(
    runtime: Runtime,
    prepare: Callable,
    source: BinaryIO,
    options: PipelineOptions,
    clock: Clock,
    is_disconnected: Disconnected | None,
    video: bool,
):
    """A CPU stage in its pool, announced to the batcher so it may wait for this request; while it
    runs, the client is watched and the stage told to stop if it leaves."""
    engine, batcher = runtime.require()
    withdraw = batcher.expect()
    stop = threading.Event()
    pool = runtime.video_pool if video else runtime.decode_pool
    work = asyncio.ensure_future(
        runtime.offload(prepare, source, engine, runtime.detector, options, stop, pool=pool)
    )
    try:
        return await wait_watched(work, is_disconnected)
    except ClientGone:
        stop.set()  # the stage ends at its next check and raises DecodeStopped
        return await work
    finally:
        withdraw()
        clock.decoded = time.perf_counter()


async def _encode(
    runtime: Runtime,
    reservation: Reservation,
    kind: str,
    prepare: Callable,
    source: BinaryIO,
    options: PipelineOptions,
    clock: Clock,
    is_disconnected: Disconnected | None,
):
    """The input's rows through `prepare` and the batcher; `kind` ("images" or "frames") is what the
    reservation counts them as, and it shrinks to the rows `prepare` gave (a short clip, fewer faces)."""
    prepared = await _prepare(runtime, prepare, source, options, clock, is_disconnected, kind == "frames")
    reservation.shrink(**{kind: len(prepared.pixels)})
    features = await runtime.batcher.submit(prepared.pixels, is_disconnected)
    return prepared, features


async def classify(
    runtime: Runtime,
    prepare: Callable,
    score: Callable,
    source: BinaryIO,
    classes: tuple[str, ...],
    prompt_set: str,
    options: PipelineOptions,
    kind: str,
    most: int,
    is_disconnected: Disconnected | None = None,
):
    """An input scored against a class list: `prepare` (a pipeline CPU stage), the encoder call through
    the batcher, the class list's text features (cached, or encoded on the device thread), then
    `score(prepared, features, text)` in the pool. `most`: the most rows `prepare` can give, as
    admission counts them (`kind`: "images" or "frames"), taken before decoding."""
    clock = Clock()
    class_text = runtime.class_text(classes, prompt_set)  # held if cached: what admission counts
    with runtime.admission.reserve(**{kind: most}, shared_texts=class_text.items) as reservation:
        prepared, features = await _encode(
            runtime, reservation, kind, prepare, source, options, clock, is_disconnected
        )
        text = await class_text.features(is_disconnected)
        result = await runtime.offload(score, prepared, features, text)
    return result, clock


async def predict_image(
    runtime: Runtime,
    source: BinaryIO,
    classes: tuple[str, ...],
    prompt_set: str,
    options: PipelineOptions,
    is_disconnected: Disconnected | None = None,
) -> tuple[pipeline.ImagePrediction, Clock]:
    def score(prepared, features, text):
        return pipeline.predict_image(prepared, features, text, classes, prompt_set, options)

    most = options.max_faces if options.detect_faces else 1
    return await classify(
        runtime, pipeline.prepare_image, score, source, classes, prompt_set, options, "images", most,
        is_disconnected,
    )  # fmt: skip


async def predict_video(
    runtime: Runtime,
    source: BinaryIO,
    classes: tuple[str, ...],
    prompt_set: str,
    options: PipelineOptions,
    per_frame: bool,
    is_disconnected: Disconnected | None = None,
) -> tuple[pipeline.VideoPrediction, Clock]:
    def score(prepared, features, text):
        return pipeline.predict_video(prepared, features, text, classes, prompt_set, per_frame)

    return await classify(
        runtime, pipeline.prepare_video, score, source, classes, prompt_set, options, "frames", options.frames,
        is_disconnected,
    )  # fmt: skip


async def retrieve(
    runtime: Runtime,
    source: BinaryIO,
    still: bool,
    descriptions: list[str],
    top_k: int,
    options: PipelineOptions,
    is_disconnected: Disconnected | None = None,
) -> tuple[pipeline.Ranking, Clock]:
    clock = Clock()
    engine, batcher = runtime.require()
    kind, most = ("images", 1) if still else ("frames", options.frames)
    with runtime.admission.reserve(**{kind: most}, texts=len(descriptions)) as reservation:
        prepare = partial(pipeline.prepare_clip, still=still)
        prepared, features = await _encode(
            runtime, reservation, kind, prepare, source, options, clock, is_disconnected
        )
        chunks = [descriptions[i : i + TEXT_CHUNK] for i in range(0, len(descriptions), TEXT_CHUNK)]
        text = [
            await batcher.run(_encode_texts, engine, chunk, items=len(chunk), is_disconnected=is_disconnected)
            for chunk in chunks
        ]
        result = await runtime.offload(
            pipeline.rank_descriptions,
            features,
            torch.cat(text),
            descriptions,
            top_k,
            pipeline.media_of(prepared),
        )
    return result, clock


def _encode_texts(engine, texts: list[str]):
    """On the device thread, back on the CPU before the thread takes its next work (see the batcher)."""
    return engine.encode_texts(texts).cpu()
