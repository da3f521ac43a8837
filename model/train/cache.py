"""The on-disk cache of (CLIP embedding, teacher feature) pairs that `fer train extract` writes.

Layout of a cache directory:

    index.json                 what made the features + the list of finished shards (see below)
    images.txt                 the ordered image list, one path a line; row i of the cache is the
                               image on line `image_index[i]`
    shard-00000.safetensors    tensors `clip` [n, D] float32 (raw CLIP image embedding, before W),
    shard-00001.safetensors    `teacher` [n, T] float32 (L2-normalised teacher feature),
    ...                        `image_index` [n] int64 (line of images.txt)

Shard k covers lines [k * shard_size, (k + 1) * shard_size) of images.txt; images that fail to decode
are listed in the shard's `failed` entry and have no row. `index.json`:

    {"format": "exp-clip-fer/train-cache", "format_version": "1",
     "settings": {"clip": {...}, "teacher": {...}},      # models, instruction, preprocessing
     "images": {"count": N, "sha256": <of images.txt>}, "shard_size": S,
     "shards": [{"file", "start", "stop", "rows", "sha256", "failed": [paths]}, ...]}

Both shards and the index are written to a temporary name and renamed, so an interrupted run leaves
only whole shards behind and a rerun continues at the first missing one. The sha256 of every shard
is in the index, so the index's own hash (`fingerprint`) identifies the data a projection was fit on.

Reading memory-maps the shards (the safetensors layout is an 8-byte header length, a JSON header and
raw little-endian arrays), so fitting on 100k+ pairs does not copy the cache into process memory. Each
shard is mapped once, whole, and its file closed once mapped: a descriptor kept per shard (or per tensor)
would run a large cache into the process's open-file limit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from model.files import write_bytes_atomic, write_text_atomic

log = logging.getLogger(__name__)

FORMAT = "exp-clip-fer/train-cache"
FORMAT_VERSION = "1"
INDEX = "index.json"
IMAGE_LIST = "images.txt"


class CacheError(ValueError):
    """A cache directory that cannot be used as asked; the message says what to do."""


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


class CacheWriter:
    """Creates a cache, or reopens an interrupted one made with the same settings and image list."""

    def __init__(self, root: Path, settings: dict, images: Sequence[str], shard_size: int):
        if shard_size < 1:
            raise ValueError("shard size must be at least 1")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        image_text = "".join(f"{p}\n" for p in images)
        images_meta = {"count": len(images), "sha256": hashlib.sha256(image_text.encode()).hexdigest()}
        index_path = self.root / INDEX
        if index_path.is_file():
            self.index = json.loads(index_path.read_text())
            wanted = {"settings": settings, "images": images_meta, "shard_size": shard_size}
            for key, value in wanted.items():
                if self.index.get(key) != json.loads(json.dumps(value)):
                    raise CacheError(
                        f"{self.root} holds a cache made with different {key.replace('_', ' ')}; "
                        "resume with the same images and options, or choose a new output folder"
                    )
        else:
            write_text_atomic(self.root / IMAGE_LIST, image_text)
            self.index = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "settings": settings,
                "images": images_meta,
                "shard_size": shard_size,
                "shards": [],
            }
            self._save_index()
        self.shard_size = shard_size
        self.n_images = len(images)

    @property
    def n_shards(self) -> int:
        return count_shards(self.n_images, self.shard_size)

    def shard_range(self, number: int) -> tuple[int, int]:
        start = number * self.shard_size
        return start, min(start + self.shard_size, self.n_images)

    def done(self, number: int) -> bool:
        name = shard_name(number)
        return any(s["file"] == name for s in self.index["shards"]) and (self.root / name).is_file()

    def pending(self) -> list[int]:
        """The shards still to write; those an earlier, interrupted run finished are said in the log."""
        todo = [k for k in range(self.n_shards) if not self.done(k)]
        if len(todo) < self.n_shards:
            done = self.n_shards - len(todo)
            log.info("%s: %d of %d shards already done, resuming", self.root, done, self.n_shards)
        return todo

    def write_shard(
        self,
        number: int,
        clip: torch.Tensor,
        teacher: torch.Tensor,
        image_index: torch.Tensor,
        failed: Sequence[str] = (),
    ) -> None:
        if not len(clip) == len(teacher) == len(image_index):
            raise ValueError("clip, teacher and image_index must have one row per image")
        name = shard_name(number)
        tensors = {
            "clip": clip.detach().float().cpu().contiguous(),
            "teacher": teacher.detach().float().cpu().contiguous(),
            "image_index": image_index.to(torch.int64).cpu().contiguous(),
        }
        data = save(tensors)  # hashed in memory, not read back from disk
        write_bytes_atomic(self.root / name, data)
        start, stop = self.shard_range(number)
        entry = {
            "file": name,
            "start": start,
            "stop": stop,
            "rows": len(clip),
            "sha256": hashlib.sha256(data).hexdigest(),
            "failed": list(failed),
        }
        shards = [s for s in self.index["shards"] if s["file"] != name] + [entry]
        self.index["shards"] = sorted(shards, key=lambda s: s["start"])
        self._save_index()

    def _save_index(self) -> None:
        write_text_atomic(self.root / INDEX, json.dumps(self.index, indent=1, sort_keys=True))


def count_shards(n_images: int, shard_size: int) -> int:
    return -(-n_images // shard_size)


def _mapped_tensors(path: Path, names: Sequence[str]) -> list[torch.Tensor]:
    """Float32 tensors of a safetensors file, as views of one private memory map of the whole file (no
    copy; torch closes the file once it is mapped)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data = torch.from_file(str(path), shared=False, size=path.stat().st_size, dtype=torch.uint8)
    tensors = []
    for name in names:
        info = header[name]
        if info["dtype"] != "F32":
            raise CacheError(f"{path}: tensor {name} is {info['dtype']}, expected F32")
        start, stop = (8 + header_len + offset for offset in info["data_offsets"])
        tensors.append(data[start:stop].view(torch.float32).view(info["shape"]))  # safetensors aligns them
    return tensors


class PairCache:
    """Read side: random batches of pairs gathered from memory-mapped shards."""

    def __init__(self, root: Path):
        self.root = Path(root)
        index_path = self.root / INDEX
        if not index_path.is_file():
            raise CacheError(
                f"{self.root} is not a feature cache (no {INDEX}): run `fer train extract` first"
            )
        self.index_text = index_path.read_text()
        self.index = json.loads(self.index_text)
        if self.index.get("format") != FORMAT:
            raise CacheError(f"{index_path}: format is {self.index.get('format')!r}, expected {FORMAT!r}")
        expected = count_shards(self.index["images"]["count"], self.index["shard_size"])
        if len(self.index["shards"]) < expected:
            raise CacheError(
                f"{self.root} is incomplete ({len(self.index['shards'])} of {expected} shards): "
                "rerun the same `fer train extract` command to finish it"
            )
        shards = [s for s in self.index["shards"] if s["rows"] > 0]
        pairs = [_mapped_tensors(self.root / s["file"], ("clip", "teacher")) for s in shards]
        self.clip = [clip for clip, _ in pairs]
        self.teacher = [teacher for _, teacher in pairs]
        sizes = np.array([s["rows"] for s in shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        if not shards:
            raise CacheError(f"{self.root} holds no pairs (every image failed to decode?)")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def settings(self) -> dict:
        return self.index["settings"]

    @property
    def fingerprint(self) -> str:
        """sha256 of the index, which holds every shard's sha256: changes whenever the data does."""
        return hashlib.sha256(self.index_text.encode()).hexdigest()

    @property
    def clip_dim(self) -> int:
        return int(self.clip[0].shape[1])

    @property
    def teacher_dim(self) -> int:
        return int(self.teacher[0].shape[1])

    def gather(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs for global row numbers, grouped by shard (row order inside a batch does not matter to
        the contrastive loss, and sorted reads are kinder to the page cache)."""
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        clip, teacher = [], []
        for shard in np.unique(shard_of):
            local = torch.from_numpy(rows[shard_of == shard] - self.offsets[shard])
            clip.append(self.clip[shard][local])
            teacher.append(self.teacher[shard][local])
        return torch.cat(clip), torch.cat(teacher)
