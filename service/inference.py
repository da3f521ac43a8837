"""The request path, as named stages that one runner takes a request through (LitServe's hooks: decode,
batch, predict, unbatch, encode):

    admission -> decode pool (a model.pipeline CPU stage) -> batcher (the encoder) -> text features
      -> scoring (decode pool) -> the response schema

Two small values carry what the stages need. A `Work`, one per endpoint and made by one small function
(`predict_image`, `predict_video`, `retrieve`), says which encoder rows its input takes in admission (a
still image's or a clip's frames, and the most it may give), how to prepare it, which texts it is scored
against, how to score it and which response to build. A `Call`, one per request, holds the loaded
model (taken once), the upload, the options, the client's disconnect check and the clock. `run(call,
work)` goes through the stages. They are model.pipeline's, the same the `fer` commands call; this module
decides where and when each one runs, and stops a decode whose client has left.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, BinaryIO, Protocol

import torch
from pydantic import BaseModel

from model import pipeline
from model.engine import FerEngine
from model.media import is_still_image
from model.options import PipelineOptions
from model.prompts import prompt_texts
from service.admission import Places
from service.batcher import ClientGone, Disconnected, wait_watched
from service.runtime import Loaded, Runtime
from service.schemas import PredictResponse, RetrieveResponse, Timing, VideoResponse

TEXT_CHUNK = 16  # descriptions encoded per device task: image batches get a turn between chunks


# ---- a request --------------------------------------------------------------------------------------
@dataclass
class Clock:
    """When a request started, when its decoding ended and how long its rows waited for the encoder
    (the batcher says): the response's `timing`."""

    started: float = field(default_factory=time.perf_counter)
    decoded: float | None = None
    queued_s: float = 0.0

    def waited(self, seconds: float) -> None:
        self.queued_s = seconds

    def timing(self) -> Timing:
        now = time.perf_counter()
        decoded = self.decoded or now
        return Timing(
            decode_ms=_ms(decoded - self.started),
            queue_ms=_ms(self.queued_s),
            inference_ms=_ms(now - decoded - self.queued_s),
            total_ms=_ms(now - self.started),
        )


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


@dataclass
class Call:
    """One request, as its stages use it."""

    runtime: Runtime  # the pools and admission
    model: Loaded  # taken once, when the request starts
    source: BinaryIO  # the upload
    media_type: str | None  # as the client declared it
    options: PipelineOptions
    is_disconnected: Disconnected | None = None
    clock: Clock = field(default_factory=Clock)


# ---- what an endpoint asks for ----------------------------------------------------------------------
@dataclass(frozen=True)
class TextPlaces:
    """The texts a request has encoded, as admission counts them."""

    own: int = 0  # encoded for this request alone: from its own share of the queue
    shared: int = 0  # encoded once and then used by every later request (a new class list's prompts)
    # Features already cached at admission, which the request keeps from then on: evicted before it
    # scores, they are not encoded again outside what admission counted.
    held: torch.Tensor | None = None


class Texts(Protocol):
    """A request's text side: what admission must count, and the features it is scored against."""

    def places(self, engine: FerEngine) -> TextPlaces: ...

    async def features(
        self, model: Loaded, places: TextPlaces, is_disconnected: Disconnected | None
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class ClassPrompts:
    """A class list's prompt features [C, P, D]: from the engine's cache, or encoded on the device thread
    once, then cached for every later request."""

    classes: tuple[str, ...]
    prompt_set: str

    def places(self, engine: FerEngine) -> TextPlaces:
        cached = engine.cached_class_features(self.classes, self.prompt_set)
        return TextPlaces(held=cached) if cached is not None else TextPlaces(shared=self._count())

    async def features(
        self, model: Loaded, places: TextPlaces, is_disconnected: Disconnected | None
    ) -> torch.Tensor:
        text = places.held
        if text is None:  # admitted as texts to encode (the engine caches them for later requests)
            text = await model.batcher.run(
                model.engine.class_features,
                self.classes,
                self.prompt_set,
                items=self._count(),
                is_disconnected=is_disconnected,
            )
        return text

    def _count(self) -> int:
        return len(prompt_texts(self.classes, self.prompt_set))


@dataclass(frozen=True)
class Descriptions:
    """Free-text descriptions' features [T, D], encoded for this request alone on the device thread."""

    texts: list[str]

    def places(self, engine: FerEngine) -> TextPlaces:
        return TextPlaces(own=len(self.texts))

    async def features(
        self, model: Loaded, places: TextPlaces, is_disconnected: Disconnected | None
    ) -> torch.Tensor:
        chunks = [self.texts[i : i + TEXT_CHUNK] for i in range(0, len(self.texts), TEXT_CHUNK)]
        return torch.cat(
            [
                await model.batcher.run(
                    _encode_texts, model.engine, chunk, items=len(chunk), is_disconnected=is_disconnected
                )
                for chunk in chunks
            ]
        )


def _encode_texts(engine: FerEngine, texts: list[str]) -> torch.Tensor:
    """On the device thread, back on the CPU before the thread takes its next work (see the batcher)."""
    return engine.encode_texts(texts).cpu()


@dataclass(frozen=True)
class Work:
    """What an endpoint asks of the request path."""

    # Encoder rows, as admission counts them: `images` (faces, or the whole image) or `frames` (a clip's
    # sampled frames' faces, or the frames, decoded in the video pool, their faces searched in the decode
    # pool). `rows` are reserved before any work, `most_rows` (the most the input can give) checked then
    # to fit at all; once decoded, the request holds the rows it gave.
    rows: Places
    most_rows: Places
    prepare: Callable[..., Any]  # a model.pipeline CPU stage: (source, to_pixels, detector, options, stop)
    texts: Texts
    score: Callable[[Any, torch.Tensor, torch.Tensor], Any]  # (prepared, features, text) -> a result
    response: type[BaseModel]  # built from the result's fields, the model's name and the timing


def predict_image(call: Call, prompts: ClassPrompts) -> Work:
    """POST /predict: each face (or the whole image) scored against a class list."""
    options = call.options

    def score(prepared, features, text):
        return pipeline.predict_image(prepared, features, text, prompts.classes, prompts.prompt_set, options)

    faces = Places(images=pipeline.max_frame_rows(options))
    return Work(
        rows=faces,  # the most, few enough to hold while one image decodes
        most_rows=faces,
        prepare=pipeline.prepare_image,
        texts=prompts,
        score=score,
        response=PredictResponse,
    )


def predict_video(call: Call, prompts: ClassPrompts, per_frame: bool) -> Work:
    """POST /predict-video: a clip's sampled frames' faces linked into tracks, each track's frames pooled
    and scored against a class list."""

    def score(prepared, features, text):
        return pipeline.predict_video(
            prepared, features, text, prompts.classes, prompts.prompt_set, per_frame
        )

    rows, most_rows = clip_rows(call.options)
    return Work(
        rows=rows,
        most_rows=most_rows,
        prepare=pipeline.prepare_video,
        texts=prompts,
        score=score,
        response=VideoResponse,
    )


async def retrieve(call: Call, descriptions: list[str], top_k: int, per_frame: bool = False) -> Work:
    """POST /retrieve: a clip (or a still image, a one-frame clip of its largest face) ranking
    descriptions, by each person's track and with each sampled frame's scores when `per_frame`. Which of
    the two the upload is, its head says (read in the decode pool), before admission counts its rows: a
    clip's as /predict-video's."""
    still = await call.runtime.offload(is_still_image, call.source, call.media_type)

    rows, most_rows = (Places(images=1),) * 2 if still else clip_rows(call.options)

    def score(prepared, features, text):
        return pipeline.rank_descriptions(prepared, features, text, descriptions, top_k, per_frame)

    return Work(
        rows=rows,
        most_rows=most_rows,
        prepare=partial(pipeline.prepare_clip, still=still),
        texts=Descriptions(descriptions),
        score=score,
        response=RetrieveResponse,
    )


def clip_rows(options: PipelineOptions) -> tuple[Places, Places]:
    """A clip's rows in admission, and the most it may give: a place a frame before decoding, the faces
    found claimed after it. Every face its frames may give, held while it decodes, would let one long
    clip hold the whole video share."""
    return Places(frames=options.frames), Places(frames=pipeline.max_video_rows(options))


# ---- the runner ---------------------------------------------------------------------------------------
async def run(call: Call, work: Work) -> BaseModel:
    """The request through every stage. Its places are admitted before any work (429 at once when there
    is no room, 413 when its most could never fit) and held until it is scored. Once decoded, it holds
    the rows it gave: a clip's faces beyond one a frame are claimed then (429 when there is no room for
    them)."""
    model, rows = call.model, work.rows
    texts = work.texts.places(model.engine)
    with call.runtime.admission.reserve(
        images=rows.images,
        frames=rows.frames,
        texts=texts.own,
        shared_texts=texts.shared,
        most=work.most_rows,
    ) as reservation:
        prepared = await _decode(call, work)
        given = len(prepared.pixels)
        reservation.settle(images=given if rows.images else 0, frames=given if rows.frames else 0)
        features = await model.batcher.submit(
            prepared.pixels, call.is_disconnected, on_wait=call.clock.waited
        )
        text = await work.texts.features(model, texts, call.is_disconnected)
        result = await call.runtime.offload(work.score, prepared, features, text)
    return work.response(**asdict(result), **model_fields(model.engine), timing=call.clock.timing())


def model_fields(engine: FerEngine) -> dict:
    """The model's name, and beside it what its answers are worth (the demo's random weights)."""
    return {"model": engine.name, "model_warning": engine.warning}


async def _decode(call: Call, work: Work):
    """The CPU stage in its pool, announced to the batcher so that it may wait for these rows. The client
    is watched meanwhile: when it leaves, or the request is cancelled (Ray Serve cancels a request whose
    client has gone), the stage is told to stop and the request goes no further, even where the stage
    had already finished."""
    model, runtime = call.model, call.runtime
    withdraw = model.batcher.expect()
    stop = threading.Event()
    prepare, pool = work.prepare, runtime.decode_pool
    if work.rows.frames:
        # A clip waits in its video thread for its frames' searches in the decode pool, whose own tasks
        # never wait on another task: decided here, together, so that no pool waits on itself.
        prepare, pool = partial(work.prepare, workers=runtime.frame_workers), runtime.video_pool
    decoding = asyncio.ensure_future(
        runtime.offload(
            prepare,
            call.source,
            model.engine.prepare_many,
            model.detector,
            call.options,
            stop,
            pool=pool,
        )
    )
    try:
        return await wait_watched(decoding, call.is_disconnected)
    except (ClientGone, asyncio.CancelledError):
        stop.set()  # the stage ends at its next check (DecodeStopped)
        with contextlib.suppress(Exception):
            await decoding  # its thread is done with the upload before the request lets go of it
        raise
    finally:
        withdraw()
        call.clock.decoded = time.perf_counter()
