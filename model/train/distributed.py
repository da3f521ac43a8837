"""`fer train extract --ray`: the extraction of model.train.extract across a Ray cluster (Ray Data).

The driver (the `fer` process) keeps everything the single-process command keeps: the cache format, the
image list and resume by shard (model.train.cache). It feeds Ray only the images of unfinished shards,
cut into the same batches the single-process command makes (`--extract-batch-size` images of one
shard), one batch per row, so each encoder call sees the same images as there and the features are
the same. Three actor pools run them:

    decode (CPU: model.media's decode, the CLIP preprocessing and BLIP-2's image processor)
      -> CLIP image encoder (GPU) -> teacher (GPU)

and the driver writes each shard as soon as all its batches are back. Both models are described once
in a Ray task with the actors' resources (so the cache records what the actors compute with, and the
decoders get the engine's own transform): one extra model load before the pipeline starts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.clip import ToPixels
from model.cluster import RayOptions, block_rows, chunk_ranges, import_ray, ragged, ray_session, run_remote
from model.engine import FerEngine, create_engine
from model.settings import ModelSettings, device_for
from model.train.cache import CacheWriter
from model.train.extract import CollatePairs, ExtractSummary, ImagePairs, clip_settings
from model.train.teacher import Teacher

log = logging.getLogger(__name__)

# A CLIP actor and a teacher actor share one GPU by default: two stages of whole-GPU actors on a
# one-GPU node would run one after the other.
GPU_SHARE = 0.5


@dataclass(frozen=True)
class TeacherChoice:
    source: str  # a local folder (absolute: actors do not run in the driver's folder) or a hub id
    instruction: str
    dtype: str = "auto"


@dataclass
class _Description:
    settings: dict  # the cache's settings, as the single-process command records them
    to_pixels: ToPixels
    teacher_processor: object
    embed_dim: int
    teacher_dim: int


def _describe(settings: ModelSettings, teacher: TeacherChoice) -> _Description:
    """Runs where the actors run: both models loaded as the actors load them."""
    device = device_for(settings.device)
    loaded = Teacher.load(teacher.source, teacher.instruction, device, teacher.dtype)
    spec = settings.resolve()
    engine = FerEngine.from_spec(spec, device, settings.dtype)
    return _Description(
        settings={"clip": clip_settings(spec, engine), "teacher": loaded.metadata()},
        to_pixels=engine.to_pixels,
        teacher_processor=loaded.image_processor,
        embed_dim=engine.embed_dim,
        teacher_dim=loaded.dim,
    )


class _Decode:
    """CPU stage: a batch's image files -> CLIP's uint8 pixels and the teacher's pixel values of the
    images that decode; the others are reported (the shard lists them as failed)."""

    def __init__(self, to_pixels: ToPixels, teacher_processor):
        self.collate = CollatePairs(to_pixels, teacher_processor)  # the single-process extraction's

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {"index": [], "failed": [], "clip_pixels": [], "teacher_pixels": []}
        for first, paths in zip(rows["first"], rows["paths"], strict=True):
            pairs = ImagePairs(paths, int(first))
            index, clip_pixels, teacher_pixels, failed = self.collate([pairs[i] for i in range(len(pairs))])
            out["index"].append(index.numpy())
            out["failed"].append(json.dumps(failed))
            if clip_pixels is not None:
                out["clip_pixels"].append(clip_pixels.numpy())
                out["teacher_pixels"].append(teacher_pixels.numpy())
            else:
                out["clip_pixels"].append(np.zeros((0, 0, 0, 0), np.uint8))
                out["teacher_pixels"].append(np.zeros((0, 0, 0, 0), np.float32))
        return {"shard": rows["shard"], "first": rows["first"], **_columns(out)}


def _encode_column(rows: dict[str, np.ndarray], source: str, target: str, encode, dim: int) -> dict:
    """`rows` with the pixel column `source` replaced by `encode`'s features in `target` (an empty batch,
    every image failed, gets an empty [0, dim] array)."""
    features = [
        encode(torch.from_numpy(pixels)).cpu().numpy() if len(pixels) else np.zeros((0, dim), np.float32)
        for pixels in rows.pop(source)
    ]
    return {**rows, target: ragged(features)}


class _ClipStage:
    """GPU stage: CLIP's raw image embedding (before W), as the single-process extraction computes it."""

    def __init__(self, settings: ModelSettings):
        self.engine = create_engine(settings)  # `settings` without W: see extract_on_ray

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _encode_column(rows, "clip_pixels", "clip", self.engine.embed_pixels, self.engine.embed_dim)


class _TeacherStage:
    """GPU stage: the teacher feature of each decoded image."""

    def __init__(self, settings: ModelSettings, teacher: TeacherChoice):
        device = device_for(settings.device)
        self.teacher = Teacher.load(teacher.source, teacher.instruction, device, teacher.dtype)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _encode_column(rows, "teacher_pixels", "teacher", self.teacher.features, self.teacher.dim)


def _columns(out: dict[str, list]) -> dict[str, np.ndarray]:
    return {
        name: np.array(values, dtype=object) if name == "failed" else ragged(values)
        for name, values in out.items()
    }


def extract_on_ray(
    images: Sequence[str],
    out_dir: Path,
    settings: ModelSettings,
    teacher: TeacherChoice,
    *,
    batch_size: int = 32,
    shard_size: int = 1024,
    options: RayOptions | None = None,
) -> ExtractSummary:
    """Fills (or resumes) the cache in `out_dir` as `model.train.extract.extract` does, on Ray.
    `settings`: the CLIP side (FER_*; the projection is ignored) and the device of the actors
    (FER_DEVICE, resolved in each actor); `teacher`: as `fer train extract` takes it."""
    options = options or RayOptions()
    settings = settings.model_copy(update={"projection": "none"})
    with ray_session(options):
        ray = import_ray()
        gpus = options.gpus(GPU_SHARE)
        described = run_remote(_describe, settings, teacher, num_gpus=gpus, num_cpus=options.cpus_per_actor)
        writer = CacheWriter(out_dir, described.settings, images, shard_size)
        todo = writer.pending()
        batches = [
            {"shard": k, "first": start, "paths": list(images[start:stop])}
            for k in todo
            for start, stop in chunk_ranges(*writer.shard_range(k), batch_size)
        ]
        expected = {k: len(chunk_ranges(*writer.shard_range(k), batch_size)) for k in todo}
        remaining = sum(len(b["paths"]) for b in batches)
        arrived: dict[int, list[dict]] = {k: [] for k in todo}
        with tqdm(total=len(images), initial=len(images) - remaining, desc="extract", unit="img") as bar:
            if batches:
                stream = _pipeline(ray, batches, settings, teacher, described, options, gpus)
                for rows in stream.iter_batches(batch_size=None, batch_format="numpy"):
                    for row in _rows(rows):
                        shard = int(row["shard"])
                        arrived[shard].append(row)
                        bar.update(len(row["index"]) + len(row["failed"]))
                        if len(arrived[shard]) == expected[shard]:
                            _write(writer, shard, arrived.pop(shard), images, described)
    return ExtractSummary.of(writer, shards_skipped=writer.n_shards - len(todo))


def _pipeline(ray, batches, settings, teacher, described, options: RayOptions, gpus: float):
    """The stages as a Ray Data pipeline; each row is one encoder batch (batch_size=1 row a call)."""
    actors = ray.data.ActorPoolStrategy(size=options.actors)
    model_resources = {"num_gpus": gpus, "num_cpus": options.cpus_per_actor}
    dataset = ray.data.from_items(batches, override_num_blocks=min(len(batches), 8 * options.decode_actors))
    dataset = dataset.map_batches(
        _Decode,
        fn_constructor_kwargs={
            "to_pixels": described.to_pixels,
            "teacher_processor": described.teacher_processor,
        },
        batch_size=1,
        num_cpus=1,
        compute=ray.data.ActorPoolStrategy(size=options.decode_actors),
    )
    dataset = dataset.map_batches(
        _ClipStage,
        fn_constructor_kwargs={"settings": settings},
        batch_size=1,
        compute=actors,
        **model_resources,
    )
    return dataset.map_batches(
        _TeacherStage,
        fn_constructor_kwargs={"settings": settings, "teacher": teacher},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=options.actors),
        **model_resources,
    )


def _rows(columns: dict[str, np.ndarray]) -> list[dict]:
    """A block of results as one dict per encoder batch, its failures decoded."""
    rows = block_rows(columns)
    for row in rows:
        row["failed"] = json.loads(row["failed"])
    return rows


def _write(writer: CacheWriter, shard: int, rows: list[dict], images: Sequence[str], described) -> None:
    """A shard from its batches, in image order, as the single-process command writes it."""
    rows.sort(key=lambda row: int(row["first"]))
    failed = []
    for row in rows:
        for i, message in row["failed"]:
            log.warning("skipping %s: %s", images[i], message)
            failed.append(images[i])
    index = [np.asarray(row["index"], dtype=np.int64) for row in rows]
    clip = [np.asarray(row["clip"], dtype=np.float32).reshape(-1, described.embed_dim) for row in rows]
    taught = [np.asarray(row["teacher"], dtype=np.float32).reshape(-1, described.teacher_dim) for row in rows]
    writer.write_shard(
        shard,
        torch.from_numpy(np.concatenate(clip)),
        torch.from_numpy(np.concatenate(taught)),
        torch.from_numpy(np.concatenate(index)),
        failed,
    )
