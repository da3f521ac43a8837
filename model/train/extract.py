"""`fer train extract`: unlabelled face images -> cached (raw CLIP embedding, teacher feature) pairs.

Images are decoded and preprocessed for both models in DataLoader workers (CLIP: the engine's
`prepare`, i.e. the configured FER_PREPROCESS; teacher: BLIP-2's own image processor), then both
encoders run on the same batch. Work is cut into shards of `shard_size` images; each finished shard is
on disk before the next starts, so memory stays at one shard and an interrupted run resumes at the
first unfinished shard (see model/train/cache.py for the format).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from model.clip import ToPixels
from model.engine import FerEngine
from model.media import IMAGE_EXTENSIONS, MediaError, decode_image
from model.registry import ModelSpec
from model.train.cache import CacheWriter
from model.train.teacher import Teacher, blip_pixel_values

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractSummary:
    cache: str
    images: int
    pairs: int
    failed: int
    shards: int
    shards_skipped: int  # already on disk from an earlier, interrupted run

    @classmethod
    def of(cls, writer: CacheWriter, shards_skipped: int) -> ExtractSummary:
        """What a finished extraction wrote, from its cache's index."""
        shards = writer.index["shards"]
        return cls(
            cache=str(writer.root),
            images=writer.n_images,
            pairs=sum(s["rows"] for s in shards),
            failed=sum(len(s["failed"]) for s in shards),
            shards=len(shards),
            shards_skipped=shards_skipped,
        )


def list_images(source: Path) -> list[str]:
    """A folder (searched recursively for image files, sorted) or a text file with one path a line
    (relative paths are relative to the list file; blank lines and `#` comments are skipped)."""
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    elif source.suffix.lower() in IMAGE_EXTENSIONS:
        raise ValueError(f"{source} is one image: pass a folder of images or a text file listing them")
    elif source.is_file():
        lines = [line.strip() for line in source.read_text().splitlines()]
        paths = [source.parent / line for line in lines if line and not line.startswith("#")]
    else:
        raise FileNotFoundError(f"{source} is neither a folder of images nor a list file")
    if not paths:
        raise ValueError(f"{source} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return [str(p.resolve()) for p in paths]


class ImagePairs(torch.utils.data.Dataset):
    """Decodes one image; a bad file becomes its error message, not an exception that kills workers."""

    def __init__(self, paths: Sequence[str], first: int):
        self.paths, self.first = paths, first

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return self.first + i, decode_image(Path(self.paths[i]))
        except (MediaError, OSError) as exc:
            return self.first + i, str(exc)


class CollatePairs:
    """Both models' CPU preprocessing of a batch (a class, so DataLoader workers can pickle it)."""

    def __init__(self, to_pixels: ToPixels, teacher_processor):
        self.to_pixels, self.teacher_processor = to_pixels, teacher_processor

    def __call__(self, items):
        good = [(i, im) for i, im in items if not isinstance(im, str)]
        failed = [(i, msg) for i, msg in items if isinstance(msg, str)]
        images = [im for _, im in good]
        if not images:
            return torch.empty(0, dtype=torch.long), None, None, failed
        index = torch.tensor([i for i, _ in good], dtype=torch.long)
        return index, self.to_pixels(images), blip_pixel_values(self.teacher_processor, images), failed


def clip_settings(spec: ModelSpec, engine: FerEngine) -> dict:
    return {
        "clip_model": spec.clip_model,
        "clip_weights": spec.clip_weights,
        "preprocess": spec.preprocess,
        "embed_dim": engine.embed_dim,
        "image_size": engine.image_size,
        "dtype": engine.dtype_name,
    }


def extract(
    images: Sequence[str],
    out_dir: Path,
    spec: ModelSpec,
    teacher: Teacher,
    *,
    batch_size: int = 32,
    shard_size: int = 1024,
    workers: int = 0,
    clip_dtype: str = "auto",
) -> ExtractSummary:
    """Fills (or resumes) the cache in `out_dir`; the CLIP side runs on the teacher's device, in
    `clip_dtype` (FER_DTYPE)."""
    engine = FerEngine.from_spec(spec.without_projection(), str(teacher.device), clip_dtype)
    settings = {"clip": clip_settings(spec, engine), "teacher": teacher.metadata()}
    writer = CacheWriter(out_dir, settings, images, shard_size)
    collate = CollatePairs(engine.to_pixels, teacher.image_processor)
    todo = writer.pending()
    remaining = sum(writer.shard_range(k)[1] - writer.shard_range(k)[0] for k in todo)
    with tqdm(total=len(images), initial=len(images) - remaining, desc="extract", unit="img") as bar:
        for number in todo:
            start, stop = writer.shard_range(number)
            loader = torch.utils.data.DataLoader(
                ImagePairs(images[start:stop], start),
                batch_size=batch_size,
                num_workers=workers,
                collate_fn=collate,
            )
            index, clip, taught, failed = [], [], [], []
            for batch_index, clip_pixels, teacher_pixels, batch_failed in loader:
                for i, message in batch_failed:
                    log.warning("skipping %s: %s", images[i], message)
                    failed.append(images[i])
                if len(batch_index):
                    index.append(batch_index)
                    clip.append(engine.embed_pixels(clip_pixels).cpu())
                    taught.append(teacher.features(teacher_pixels).cpu())
                bar.update(len(batch_index) + len(batch_failed))
            writer.write_shard(
                number,
                torch.cat(clip) if clip else torch.empty(0, engine.embed_dim),
                torch.cat(taught) if taught else torch.empty(0, teacher.dim),
                torch.cat(index) if index else torch.empty(0, dtype=torch.long),
                failed,
            )
    return ExtractSummary.of(writer, shards_skipped=writer.n_shards - len(todo))
