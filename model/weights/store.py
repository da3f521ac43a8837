"""What a preset needs in the weights folder, and whether what is there verifies: the official projections
by their git blob ids, CLIP files by the sha256 that `manifest.json` recorded when they were downloaded."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from model.files import hash_into, sha256_file, write_text_atomic
from model.registry import (
    CLIP_SUBDIR,
    RANDOM,
    ProjectionRelease,
    clip_checkpoint_stem,
    find_clip_checkpoint,
    get_preset,
    projection_path,
)

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
DEFAULT_CLIP_SUFFIX = ".safetensors"  # what open_clip's hub entries for the presets give


@dataclass(frozen=True)
class WeightsFile:
    """One file a preset needs: its place under the weights folder and how it is obtained and checked."""

    kind: str  # "clip" or "projection"
    relpath: str  # under the weights folder; for CLIP, the name a download gives when none is there
    source: str  # for humans: where it comes from
    clip_model: str | None = None
    clip_tag: str | None = None
    blob_sha1: str | None = None  # projections: the git blob id that verifies them
    url: str | None = None  # projections: where to fetch them


def preset_files(name: str, mirror: str | None = None) -> list[WeightsFile]:
    """The files a preset needs (none for `demo`; only CLIP for the plain-CLIP baselines)."""
    preset = get_preset(name)
    files = []
    if preset.clip_weights != RANDOM:
        stem = clip_checkpoint_stem(preset.clip_model, preset.clip_weights)
        files.append(
            WeightsFile(
                kind="clip",
                relpath=f"{CLIP_SUBDIR}/{stem}{DEFAULT_CLIP_SUFFIX}",
                source=f"open_clip registry: {preset.clip_model} / {preset.clip_weights}",
                clip_model=preset.clip_model,
                clip_tag=preset.clip_weights,
            )
        )
    if isinstance(preset.projection, ProjectionRelease):
        release = preset.projection
        url = release.url(mirror)
        files.append(
            WeightsFile(
                kind="projection",
                relpath=projection_path(Path(), release).as_posix(),
                source=url,
                blob_sha1=release.blob_sha1,
                url=url,
            )
        )
    return files


# ---- hashes and the manifest --------------------------------------------------------------------------
def git_blob_sha1(path: Path) -> str:
    """Git's id of a file's content (SHA-1 of `blob <size>\\0` + content): what a git host lists for it."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    hash_into(digest, path)
    return digest.hexdigest()


def read_manifest(weights_dir: Path) -> dict[str, dict]:
    path = Path(weights_dir) / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return {}


def record(weights_dir: Path, relpath: str, stored: Path, source: str, sha256: str | None = None) -> None:
    """Adds the stored file to the manifest; `sha256` when already computed (a 1.7 GB L/14 is read once)."""
    manifest = read_manifest(weights_dir)
    manifest[relpath] = {
        "sha256": sha256 or sha256_file(stored),
        "size": stored.stat().st_size,
        "source": source,
        "downloaded_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_text_atomic(
        Path(weights_dir) / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    )


# ---- checking what is there ---------------------------------------------------------------------------
@dataclass(frozen=True)
class FileState:
    path: Path  # where the file is, or would be
    present: bool
    ok: bool  # present and verified, or present with nothing recorded to verify against
    detail: str


def locate(file: WeightsFile, weights_dir: Path) -> Path | None:
    """Where the loader would find the file (a CLIP checkpoint may have any of the accepted suffixes)."""
    if file.kind == "clip":
        return find_clip_checkpoint(weights_dir, file.clip_model, file.clip_tag)
    path = Path(weights_dir) / file.relpath
    return path if path.is_file() else None


def check_file(file: WeightsFile, weights_dir: Path) -> FileState:
    """Is the file there, and does it match what verifies it (blob id, or the manifest's sha256)?"""
    weights_dir = Path(weights_dir)
    path = locate(file, weights_dir)
    if path is None:
        return FileState(weights_dir / file.relpath, False, False, "missing")
    if file.kind == "projection":
        actual = git_blob_sha1(path)
        if actual != file.blob_sha1:
            return FileState(path, True, False, f"git blob id {actual} != official {file.blob_sha1}")
        return FileState(path, True, True, "git blob id matches the official release")
    record = read_manifest(weights_dir).get(path.relative_to(weights_dir).as_posix())
    if record is None:
        return FileState(path, True, True, "present, no recorded checksum (not downloaded by fer)")
    actual = sha256_file(path)
    if actual != record.get("sha256"):
        return FileState(path, True, False, f"sha256 {actual} != recorded {record.get('sha256')}")
    return FileState(path, True, True, "sha256 matches the manifest")


