"""The request pipeline: a request's places are admitted first, then the pipeline's CPU stages run in
the decode pool, the encoder call goes through the shared batcher, and scoring runs in the pool again.
The stages are model.pipeline's, the same the `fer` commands call; this module only decides where
each one runs."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import BinaryIO

from model import pipeline
from model.options import PipelineOptions
from service.runtime import Runtime

Disconnected = Callable[[], Awaitable[bool]] | None


@dataclass
class Clock:
    """When a request started and when its decoding ended (the response's `timing`)."""

    started: float = field(default_factory=time.perf_counter)
    decoded: float | None = None

    def mark_decoded(self) -> None:
        self.decoded = time.perf_counter()


async def _prepare(runtime: Runtime, prepare, source: BinaryIO, options: PipelineOptions, clock: Clock):
    """A CPU stage in the decode pool, announced to the batcher so it may wait for this request."""
    engine, batcher = runtime.require()
    withdraw = batcher.expect()
    try:
        return await runtime.offload(prepare, source, engine, runtime.detector, options)
    finally:
        withdraw()
        clock.mark_decoded()


async def classify(
    runtime: Runtime,
    prepare: Callable,
    score: Callable,
    source: BinaryIO,
    classes: tuple[str, ...],
    prompt_set: str,
    options: PipelineOptions,
    max_items: int,
    is_disconnected: Disconnected = None,
):
    """An input scored against a class list: `prepare` (a pipeline CPU stage) in the pool, the encoder
    call through the batcher, the class list's text features (cached, or encoded on the device thread),
    then `score(prepared, features, text)` in the pool. `max_items`: the most rows `prepare` can give
    (faces, frames), the places taken before decoding."""
    clock = Clock()
    _, batcher = runtime.require()
    texts = runtime.text_items(classes, prompt_set)
    with runtime.admission.reserve(images=max_items, texts=texts) as places:
        prepared = await _prepare(runtime, prepare, source, options, clock)
        places.shrink(images=len(prepared.pixels))
        features = await batcher.submit(prepared.pixels, is_disconnected)
        text = await runtime.class_features(classes, prompt_set, is_disconnected)
        result = await runtime.offload(score, prepared, features, text)
    return result, clock


async def predict_image(
    runtime: Runtime,
    source: BinaryIO,
    classes: tuple[str, ...],
    prompt_set: str,
    options: PipelineOptions,
    is_disconnected: Disconnected = None,
) -> tuple[pipeline.ImagePrediction, Clock]:
    def score(prepared, features, text):
        return pipeline.predict_image(prepared, features, text, classes, prompt_set, options)

    max_items = options.max_faces if options.detect_faces else 1
    return await classify(
        runtime,
        pipeline.prepare_image,
        score,
        source,
        classes,
        prompt_set,
        options,
        max_items,
        is_disconnected,
    )


async def predict_video(
    runtime: Runtime,
    source: BinaryIO,
    classes: tuple[str, ...],
    prompt_set: str,
    options: PipelineOptions,
    per_frame: bool,
    is_disconnected: Disconnected = None,
) -> tuple[pipeline.VideoPrediction, Clock]:
    def score(prepared, features, text):
        return pipeline.predict_video(prepared, features, text, classes, prompt_set, per_frame)

    return await classify(
        runtime,
        pipeline.prepare_video,
        score,
        source,
        classes,
        prompt_set,
        options,
        options.frames,
        is_disconnected,
    )


async def retrieve(
    runtime: Runtime,
    source: BinaryIO,
    still: bool,
    descriptions: list[str],
    top_k: int,
    options: PipelineOptions,
    is_disconnected: Disconnected = None,
) -> tuple[pipeline.Ranking, Clock]:
    clock = Clock()
    engine, batcher = runtime.require()
    with runtime.admission.reserve(images=1 if still else options.frames, texts=len(descriptions)):
        prepare = partial(pipeline.prepare_clip, still=still)
        prepared = await _prepare(runtime, prepare, source, options, clock)
        features = await batcher.submit(prepared.pixels, is_disconnected)
        text = await batcher.run(
            _encode_texts, engine, descriptions, items=len(descriptions), is_disconnected=is_disconnected
        )
        result = await runtime.offload(
            pipeline.rank_descriptions, features, text, descriptions, top_k, pipeline.media_of(prepared)
        )
    return result, clock


def _encode_texts(engine, texts: list[str]):
    """On the device thread, back on the CPU before the thread takes its next work (see the batcher)."""
    return engine.encode_texts(texts).cpu()
