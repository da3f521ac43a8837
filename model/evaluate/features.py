"""Encoding an evaluation set: every image or clip goes through the CLIP image encoder ONCE per model.

From that one pass come both features the evaluation needs: the projected feature (what the model
classifies with; every prompt set is scored from it) and the plain-CLIP feature before W (for the
feature-variance comparison, docs/method.md, feature variance).
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from model.engine import FerEngine
from model.faces.base import FaceDetector
from model.media import MediaError, is_video_path
from model.options import PipelineOptions
from model.pipeline import encode_in_batches, open_source, pool_groups, prepare_clip

log = logging.getLogger(__name__)

DECODE_THREADS = min(8, os.cpu_count() or 1)


@dataclass
class EncodedItems:
    kept: list[int]  # positions of the items that decoded, in input order
    features: torch.Tensor  # [n, feature_dim]: projected, pooled over frames, L2-normalised (CPU)
    clip_features: torch.Tensor  # [n, embed_dim]: the same before W (plain CLIP), pooled, L2 (CPU)
    failures: dict[int, str] = field(default_factory=dict)  # position -> why it could not be read


def engine_fields(choice_entry: str, engine: FerEngine) -> dict:
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
    """Each item through the pipeline's stages as a clip (an image is a one-frame clip): its feature is
    the mean of its frame features, L2-normalised, for the projected and the plain-CLIP feature alike.
    Unreadable files are skipped and reported in `failures` (the evaluation lists them), not fatal: one
    corrupt file should not end a long run."""
    if batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    kept, features, clip_features, failures = [], [], [], {}
    with ThreadPoolExecutor(DECODE_THREADS) as pool, tqdm(total=len(paths), desc=desc, unit="item") as bar:
        for start in range(0, len(paths), batch_size):
            chunk = range(start, min(start + batch_size, len(paths)))
            prepared = list(pool.map(lambda i: _prepare(engine, detector, paths[i], options), chunk))
            ok = []
            for i, result in zip(chunk, prepared, strict=True):
                if isinstance(result, str):
                    failures[i] = result
                    log.warning("%s: %s (skipped)", paths[i], result)
                else:
                    ok.append((i, result))
            if ok:
                raw = encode_in_batches(engine.embed_pixels, torch.cat([p.pixels for _, p in ok]), batch_size)
                projected = engine.project(raw.to(engine.device)).cpu()
                sizes = [
                    len(p.pixels) for _, p in ok
                ]  # both spaces pooled alike: mean of the frames, then L2
                kept.extend(i for i, _ in ok)
                features.extend(pool_groups(projected, sizes))
                clip_features.extend(pool_groups(raw, sizes))
            bar.update(len(chunk))
    if not kept:
        raise MediaError(f"none of the {len(paths)} files could be read")
    return EncodedItems(kept, torch.stack(features), torch.stack(clip_features), failures)


def _prepare(engine: FerEngine, detector: FaceDetector | None, path: Path, options: PipelineOptions):
    """CPU stages, run in threads: a file -> its prepared clip, or the reason it failed."""
    try:
        with open_source(path) as source:
            return prepare_clip(source, engine, detector, options, still=not is_video_path(path))
    except (MediaError, OSError) as exc:
        return str(exc)
