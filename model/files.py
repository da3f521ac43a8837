"""File helpers shared by the weights manager and the training cache: hashing in blocks, and writes
that a crash never leaves half-done."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

PARTIAL_SUFFIX = ".partial"
READ_BLOCK = 1 << 20


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in blocks (weights and feature shards are too big to read whole)."""
    digest = hashlib.sha256()
    hash_into(digest, path)
    return digest.hexdigest()


def hash_into(digest, path: Path) -> None:
    with open(path, "rb") as f:
        while block := f.read(READ_BLOCK):
            digest.update(block)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Writes under a `.partial` name, then renames: a reader sees the old file or the new one, never
    half of one (a manifest or a cache index cut short by a crash would hide the files it lists)."""
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    partial.write_bytes(data)
    os.replace(partial, path)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def human_size(n: float) -> str:
    """Bytes as people read them: `512 B`, `8.0 MiB`, `1.6 GiB`."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def unreadable(exc: OSError) -> str:
    """Why a file could not be read, in words: an OSError's meaning without its errno and repeated path."""
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "a folder, not a file"
    if isinstance(exc, PermissionError):
        return "no permission to read it"
    return f"it cannot be read ({(exc.strerror or type(exc).__name__).lower()})"
