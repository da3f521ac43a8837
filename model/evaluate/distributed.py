"""`fer eval --ray` / `fer eval-retrieval --ray`: the evaluation's encoder pass on a Ray cluster.

The driver (the `fer` process) keeps the evaluation (model.evaluate.run / .retrieval): reading the
data, scoring, metrics and plots. The pass over the items goes to Ray Data, in the same chunks as
`encode_items` (`--batch-size` items, their frames encoded in batches of `--batch-size` rows), so the
features are the ones the single-process command computes:

    decode (CPU actors: the pipeline's prepare stages, model.pipeline) -> encoder (model actors)

The text side (class prompts, descriptions) runs in one more actor with a model actor's resources, so
text and images are encoded on the same kind of device in the same precision, as in one process.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.clip import ToPixels, clip_transform
from model.cluster import RayOptions, block_rows, chunk_ranges, for_workers, import_ray, ragged, run_remote
from model.engine import create_engine
from model.evaluate.features import EncodedItems, Unreadable, encode_chunk, prepare_item
from model.faces.base import FaceDetector
from model.faces.factory import create_detector
from model.media import MediaError
from model.options import PipelineOptions
from model.pipeline import frame_boxes
from model.settings import ModelSettings

log = logging.getLogger(__name__)


def _to_pixels(settings: ModelSettings) -> ToPixels:
    """The engine's own preprocessing, for the decode actors, which hold no CLIP weights: resolved where
    the actors run, so a model file missing there is one error here, but built from the architecture's
    config, not its weights."""
    return ToPixels(clip_transform(settings.resolve()))


class _Decode:
    """CPU stage: a chunk's files -> the frames of those that decode, one item after another, and why
    the others did not."""

    def __init__(self, to_pixels: ToPixels, options: PipelineOptions, settings: ModelSettings):
        self.to_pixels = to_pixels
        self.options = options
        # As `fer eval` makes its detector (cli/evaluate.py): the configured one, when faces are asked for.
        detect = options.detect_faces
        self.detector = create_detector(settings.face_detector, settings.face_threshold) if detect else None

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kept, failures, pixels, boxes = [], [], [], []
        for first, paths in zip(rows["first"], rows["paths"], strict=True):
            positions, failed, frames, faces = [], {}, [], []
            for i, path in enumerate(paths, start=int(first)):
                result = prepare_item(self.to_pixels, self.detector, Path(path), self.options)
                if isinstance(result, Unreadable):
                    failed[i] = result.reason
                else:
                    positions.append(i)
                    frames.append(result.pixels)
                    faces.append(frame_boxes(result))
            kept.append(np.array(positions, dtype=np.int64))
            failures.append(json.dumps(failed))
            boxes.append(json.dumps(faces))  # each item's face boxes per frame: whose rows are whose
            pixels.append(torch.cat(frames).numpy() if frames else np.zeros((0, 0, 0, 0), np.uint8))
        return {
            "first": rows["first"],
            "kept": ragged(kept),
            "failures": np.array(failures, dtype=object),
            "boxes": np.array(boxes, dtype=object),
            "pixels": ragged(pixels),
        }


class _Encode:
    """Model stage: a chunk's frames -> each item's projected and plain-CLIP feature (`encode_chunk`)."""

    def __init__(self, settings: ModelSettings, batch_size: int):
        self.engine = create_engine(settings)
        self.batch_size = batch_size

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        features, plain = [], []
        for pixels, boxes in zip(rows.pop("pixels"), rows["boxes"], strict=True):
            items = json.loads(boxes)
            if items:
                projected, raw = encode_chunk(self.engine, torch.from_numpy(pixels), items, self.batch_size)
                features.append(torch.stack(projected).numpy())
                plain.append(torch.stack(raw).numpy())
            else:
                features.append(np.zeros((0, self.engine.feature_dim), np.float32))
                plain.append(np.zeros((0, self.engine.embed_dim), np.float32))
        return {**rows, "features": ragged(features), "clip_features": ragged(plain)}


class _TextEngine:
    """A Ray actor holding an engine for the text side of the evaluation."""

    def __init__(self, settings: ModelSettings):
        self.engine = create_engine(settings)

    def where(self) -> tuple[str, str]:
        return str(self.engine.device), self.engine.dtype_name

    def class_features(self, classes: tuple[str, ...], prompt_set: str) -> torch.Tensor:
        return self.engine.class_features(classes, prompt_set)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.engine.encode_texts(texts).cpu()


class RemoteEngine:
    """What the evaluation asks of its engine (the text side, and where it runs), answered by an actor
    with a model actor's resources. The actor starts on first use, which is after the items are encoded
    (run_eval and run_retrieval encode first), so it never waits for the GPUs the encoder actors hold;
    it stops when this object is dropped."""

    def __init__(self, settings: ModelSettings, num_gpus: float, num_cpus: float):
        self.settings, self.num_gpus, self.num_cpus = settings, num_gpus, num_cpus
        self._actor = None
        self._where: tuple[str, str] | None = None

    def _call(self, method: str, *args):
        ray = import_ray()
        if self._actor is None:
            actor_class = ray.remote(num_gpus=self.num_gpus, num_cpus=self.num_cpus)(_TextEngine)
            self._actor = actor_class.remote(self.settings)
        return ray.get(getattr(self._actor, method).remote(*args))

    @property
    def device(self) -> str:
        self._where = self._where or self._call("where")
        return self._where[0]

    @property
    def dtype_name(self) -> str:
        self._where = self._where or self._call("where")
        return self._where[1]

    def class_features(self, classes: tuple[str, ...], prompt_set: str) -> torch.Tensor:
        return self._call("class_features", classes, prompt_set)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self._call("encode_texts", list(texts))


class RayEvalBackend:
    """The evaluation's encoders on Ray (model.evaluate.features.EncodeBackend). Used inside a
    `model.cluster.ray_session`."""

    def __init__(self, options: RayOptions | None = None):
        self.options = options or RayOptions()

    def engine(self, settings: ModelSettings) -> RemoteEngine:
        gpus = self.options.gpus(1.0)
        return RemoteEngine(for_workers(settings), gpus, self.options.cpus_per_actor)

    def encode(
        self,
        settings: ModelSettings,
        paths: Sequence[Path],
        options: PipelineOptions,
        *,
        detector: FaceDetector | None,
        batch_size: int,
        desc: str,
    ) -> EncodedItems:
        """`encode_items` on the cluster. `detector` is not used: the decode actors make their own from the
        settings (FER_FACE_DETECTOR, FER_FACE_THRESHOLD) when `options.detect_faces`, as `fer eval` does."""
        ray = import_ray()
        settings = for_workers(settings)
        gpus = self.options.gpus(1.0)
        to_pixels = run_remote(_to_pixels, settings)
        chunks = [
            {"first": start, "paths": [str(Path(p).resolve()) for p in paths[start:stop]]}
            for start, stop in chunk_ranges(0, len(paths), batch_size)
        ]
        if not chunks:
            raise MediaError("none of the 0 files could be read")
        dataset = ray.data.from_items(
            chunks, override_num_blocks=min(len(chunks), 8 * self.options.decode_actors)
        )
        dataset = dataset.map_batches(
            _Decode,
            fn_constructor_kwargs={
                "to_pixels": to_pixels,
                "options": options,
                "settings": settings,
            },
            batch_size=1,
            num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=self.options.decode_actors),
        )
        dataset = dataset.map_batches(
            _Encode,
            fn_constructor_kwargs={"settings": settings, "batch_size": batch_size},
            batch_size=1,
            num_gpus=gpus,
            num_cpus=self.options.cpus_per_actor,
            compute=ray.data.ActorPoolStrategy(size=self.options.actors),
        )
        results = []
        with tqdm(total=len(paths), desc=desc, unit="item") as bar:
            for block in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                for row in block_rows(block):
                    results.append(row)
                    bar.update(len(row["kept"]) + len(json.loads(row["failures"])))
        return _collect(results, paths)


def _collect(results: list[dict], paths: Sequence[Path]) -> EncodedItems:
    """The chunks' results in input order, as `encode_items` returns them."""
    results.sort(key=lambda row: int(row["first"]))
    kept, features, plain, failures = [], [], [], {}
    for row in results:
        for position, why in json.loads(row["failures"]).items():
            failures[int(position)] = why
            log.warning("%s: %s (skipped)", paths[int(position)], why)
        if len(row["kept"]):
            kept.extend(int(i) for i in row["kept"])
            features.append(np.asarray(row["features"], dtype=np.float32))
            plain.append(np.asarray(row["clip_features"], dtype=np.float32))
    if not kept:
        raise MediaError(f"none of the {len(paths)} files could be read")
    return EncodedItems(
        kept, torch.from_numpy(np.concatenate(features)), torch.from_numpy(np.concatenate(plain)), failures
    )
