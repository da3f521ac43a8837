"""Encoding an evaluation set: every image or clip goes through the CLIP image encoder ONCE per model.

From that one pass come both features the evaluation needs: the projected feature (what the model
classifies with; every prompt set is scored from it) and the plain-CLIP feature before W (for the
feature-variance comparison, docs/method.md, feature variance).
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from tqdm import tqdm

from model.cluster import chunk_ranges
from model.engine import FerEngine, create_engine
from model.faces.base import FaceDetector
from model.files import unreadable
from model.media import MediaError, is_video_path
from model.options import PipelineOptions
from model.pipeline import (
    FrameBoxes,
    PreparedImage,
    PreparedVideo,
    Preprocess,
    clip_people,
    encode_in_batches,
    frame_boxes,
    open_source,
    pool,
    prepare_clip,
    row_count,
)

if TYPE_CHECKING:
    from model.evaluate.models import ModelChoice
    from model.settings import ModelSettings

log = logging.getLogger(__name__)

DECODE_THREADS = min(8, os.cpu_count() or 1)


@dataclass(frozen=True)
class Unreadable:
    """An item that could not be read, and why: the evaluation lists it and goes on, since one corrupt
    file should not end a long run."""

    reason: str


@dataclass
class EncodedItems:
    kept: list[int]  # positions of the items that decoded, in input order
    features: torch.Tensor  # [n, feature_dim]: projected, pooled over frames, L2-normalised (CPU)
    clip_features: torch.Tensor  # [n, embed_dim]: the same before W (plain CLIP), pooled, L2 (CPU)
    failures: dict[int, str] = field(default_factory=dict)  # position -> why it could not be read


class TextSide(Protocol):
    """What an evaluation asks of a model besides its image features: text features, and where and in
    what precision it computes (a FerEngine, or model.evaluate.distributed's actor that holds one)."""

    @property
    def device(self) -> object: ...

    @property
    def dtype_name(self) -> str: ...

    def class_features(self, classes: tuple[str, ...], prompt_set: str) -> torch.Tensor: ...

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor: ...


class EncodeBackend(Protocol):
    """Where an evaluation's encoders run when not in this process: `fer eval --ray` passes one
    (model.evaluate.distributed). `engine` answers the text side and says where features are computed;
    `encode` gives what `encode_items` gives, computed elsewhere from the model's settings."""

    def engine(self, settings: ModelSettings) -> TextSide: ...

    def encode(
        self,
        settings: ModelSettings,
        paths: Sequence[Path],
        options: PipelineOptions,
        *,
        detector: FaceDetector | None,
        batch_size: int,
        desc: str,
    ) -> EncodedItems: ...


def encode_each_model(
    models: Sequence[ModelChoice],
    paths: Sequence[Path],
    options: PipelineOptions,
    backend: EncodeBackend | None,
    score: Callable[[ModelChoice, TextSide, EncodedItems], None],
    *,
    batch_size: int,
    detector: FaceDetector | None,
) -> None:
    """Each model's text side and features of `paths`, computed here or where `backend` runs the
    encoders (a Ray cluster for `--ray`, with the same results), handed to `score`; then freed, so the
    next model loads into the memory this one held."""
    if batch_size < 1:  # before a model loads or a cluster starts work
        raise ValueError("--batch-size must be at least 1")
    common = {"detector": detector, "batch_size": batch_size}
    for choice in models:
        if backend is None:
            engine = create_engine(choice.settings)
            encoded = encode_items(engine, paths, options, desc=choice.name, **common)
        else:
            engine = backend.engine(choice.settings)
            encoded = backend.encode(choice.settings, paths, options, desc=choice.name, **common)
        score(choice, engine, encoded)
        del engine, encoded
        free_memory()


def engine_fields(choice_entry: str, engine: TextSide) -> dict:
    """What every per-model result records about how it was computed."""
    return {"entry": choice_entry, "device": str(engine.device), "dtype": engine.dtype_name}


def free_memory() -> None:
    """After a model's turn (its engine and features deleted): collect them and give the GPU cache
    back, so the next model loads into the memory this one held."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def encode_items(
    engine: FerEngine,
    paths: Sequence[Path],
    options: PipelineOptions,
    *,
    detector: FaceDetector | None = None,
    batch_size: int = 64,
    desc: str = "encoding",
) -> EncodedItems:
    """Each item through the pipeline's stages as a clip (an image is a one-frame clip of its largest
    face): its feature is the mean of its main track's frame features (or of the whole frames where no
    face is found), L2-normalised, for the projected and the plain-CLIP feature alike, as the service
    answers a clip.
    Unreadable files are skipped and reported in `failures` (the evaluation lists them), not fatal: one
    corrupt file should not end a long run."""
    kept, features, clip_features, failures = [], [], [], {}
    to_pixels = engine.prepare_many
    with ThreadPoolExecutor(DECODE_THREADS) as pool, tqdm(total=len(paths), desc=desc, unit="item") as bar:
        for start, stop in chunk_ranges(0, len(paths), batch_size):  # the chunks the Ray path cuts
            chunk = range(start, stop)
            prepared = list(pool.map(lambda i: prepare_item(to_pixels, detector, paths[i], options), chunk))
            ok = []
            for i, result in zip(chunk, prepared, strict=True):
                if isinstance(result, Unreadable):
                    failures[i] = result.reason
                    log.warning("%s: %s (skipped)", paths[i], result.reason)
                else:
                    ok.append((i, result))
            if ok:
                pixels = torch.cat([p.pixels for _, p in ok])
                projected, plain = encode_chunk(engine, pixels, [frame_boxes(p) for _, p in ok], batch_size)
                kept.extend(i for i, _ in ok)
                features.extend(projected)
                clip_features.extend(plain)
            bar.update(len(chunk))
    if not kept:
        raise MediaError(f"none of the {len(paths)} files could be read")
    return EncodedItems(kept, torch.stack(features), torch.stack(clip_features), failures)


def encode_chunk(
    engine: FerEngine, pixels: torch.Tensor, items: Sequence[FrameBoxes], batch_size: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One chunk's items, their rows one after another in `pixels` (each item's face boxes per frame,
    `items`, say how many and whose), through the encoder in batches of `batch_size` rows -> per item,
    the projected and the plain-CLIP feature of its main track (`clip_people`), both pooled alike (mean of
    the frames, then L2), on the CPU. The Ray path (model.evaluate.distributed) calls it on the same
    chunks, so both give the same features."""
    raw = encode_in_batches(engine.embed_pixels, pixels, batch_size)
    projected = engine.project(raw.to(engine.device)).cpu()
    sizes = [row_count(boxes) for boxes in items]
    features, plain = [], []
    for boxes, item, item_raw in zip(items, projected.split(sizes), raw.split(sizes), strict=True):
        rows = clip_people(boxes, item).rows  # the plain-CLIP feature pools the same faces
        features.append(pool(item[rows]))
        plain.append(pool(item_raw[rows]))
    return features, plain


def prepare_item(
    to_pixels: Preprocess, detector: FaceDetector | None, path: Path, options: PipelineOptions
) -> PreparedImage | PreparedVideo | Unreadable:
    """CPU stages, run in threads (or Ray's decode actors, which hold no model): a file -> its prepared
    clip, or why it could not be read."""
    try:
        with open_source(path) as source:
            # A clip's every face: encode_chunk keeps its main track's, as /retrieve ranks by it. Its
            # frames are searched one after another: items are already prepared DECODE_THREADS at a time,
            # and frame tasks on top would put more threads than cores to work.
            return prepare_clip(source, to_pixels, detector, options, still=not is_video_path(path))
    except MediaError as exc:
        return Unreadable(str(exc))
    except OSError as exc:
        return Unreadable(unreadable(exc))
