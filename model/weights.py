"""`fer weights`: fetch, list and re-check the weight files the loader looks for.

Nothing else in the project downloads. This module puts each file exactly where `model/presets.py`
says the loader finds it, so `fer serve` and the CLI need no further configuration:
- CLIP weights come through open_clip's own registry (`get_pretrained_cfg` + `download_pretrained`),
  into a temporary folder inside the weights folder, and land at `clip/<model>__<tag><suffix>`.
  open_clip checks the sha256 of URL downloads that carry one; a Hugging Face Hub download is checked
  here against the hub's own id for it (an LFS file's cache blob is named by its sha256).
- The official Exp-CLIP projections come from the official repository at the pinned commit (or from
  `FER_WEIGHTS_MIRROR`) and are checked against their git blob ids, so the host need not be trusted.

Every file is written under a `.partial` name and renamed only after it verified, so a broken download
never looks complete; a file that is present and verifies is not fetched again. The sha256 of each stored
file goes into `manifest.json`, which is what `fer weights verify` re-checks CLIP files against.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from model.files import PARTIAL_SUFFIX, hash_into, sha256_file, write_text_atomic
from model.presets import (
    CLIP_SUBDIR,
    PRESETS,
    PROJECTION_RELEASES,
    clip_checkpoint_stem,
    find_clip_checkpoint,
    get_preset,
    projection_path,
)

log = logging.getLogger(__name__)

MIRROR_ENV = "FER_WEIGHTS_MIRROR"
MANIFEST_NAME = "manifest.json"
DEFAULT_CLIP_SUFFIX = ".safetensors"  # what open_clip's hub entries for the presets give
TIMEOUT_S = 60
# Official projections are about 8 MiB (B/32) and 12 MiB (L/14): a mirror sending more than this is
# wrong, and is stopped before it fills the disk (the blob id is only checked once the file is whole).
MAX_PROJECTION_BYTES = 64 << 20
CHUNK = 1 << 20
SHA256_NAME = re.compile(r"[0-9a-f]{64}")


class WeightsDownloadError(RuntimeError):
    """A download that failed or did not verify; the message says why and what to do."""


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
    if preset.clip_weights != "random":
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
    if preset.projection in PROJECTION_RELEASES:
        release = PROJECTION_RELEASES[preset.projection]
        url = f"{mirror.rstrip('/')}/{release.filename}" if mirror else release.url
        files.append(
            WeightsFile(
                kind="projection",
                relpath=projection_path(Path(), preset.projection).as_posix(),
                source=url,
                blob_sha1=release.blob_sha1,
                url=url,
            )
        )
    return files


def mirror_from_env() -> str | None:
    return os.environ.get(MIRROR_ENV) or None


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


def _record(weights_dir: Path, relpath: str, stored: Path, source: str, sha256: str | None = None) -> None:
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


# ---- downloading --------------------------------------------------------------------------------------
def ensure(file: WeightsFile, weights_dir: Path, preset: str) -> tuple[Path, bool]:
    """Makes one file present and verified. Returns (path, whether it was downloaded now)."""
    state = check_file(file, weights_dir)
    if state.ok:
        return state.path, False
    if state.present:
        log.warning("%s does not verify (%s): downloading it again", state.path, state.detail)
    fetch = _fetch_clip if file.kind == "clip" else _fetch_projection
    return fetch(file, Path(weights_dir), preset), True


def _fetch_projection(file: WeightsFile, weights_dir: Path, preset: str) -> Path:
    target = weights_dir / file.relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    try:
        try:
            _download_url(file.url, partial, MAX_PROJECTION_BYTES)
        except (OSError, ValueError) as exc:
            raise _download_failed(
                f"the projection {target.name}", file.url, exc, preset, weights_dir
            ) from exc
        actual = git_blob_sha1(partial)
        if actual != file.blob_sha1:
            raise WeightsDownloadError(
                f"{file.url} does not match the official release (git blob id {actual}, expected "
                f"{file.blob_sha1}); nothing was stored. The download or the mirror is corrupt: try again, "
                f"or point {MIRROR_ENV} at a copy of the official checkpoint/ folder."
            )
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    _record(weights_dir, file.relpath, target, file.url)
    return target


def _download_url(url: str, dest: Path, max_bytes: int) -> None:
    """Streams a projection file at `url` (http, https or file) to `dest` with a progress bar; a short
    read is an error, and so is more than `max_bytes` (stopped there, whatever Content-Length says)."""
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(dest, "wb") as out:
        length = response.headers.get("Content-Length")
        expected = int(length) if length else None
        if expected is not None and expected > max_bytes:
            raise _too_large(url, max_bytes)
        received = 0
        with tqdm(
            total=expected, unit="B", unit_scale=True, desc=dest.name.removesuffix(PARTIAL_SUFFIX)
        ) as bar:
            while block := response.read(CHUNK):
                if received + len(block) > max_bytes:
                    raise _too_large(url, max_bytes)
                out.write(block)
                received += len(block)
                bar.update(len(block))
    if expected is not None and received != expected:
        raise OSError(f"the connection closed after {received} of {expected} bytes")


def _too_large(url: str, max_bytes: int) -> WeightsDownloadError:
    return WeightsDownloadError(
        f"{url} is larger than any official projection (over {_size(max_bytes)}): the download was "
        f"stopped and nothing was stored. The mirror is wrong: point {MIRROR_ENV} at a copy of the "
        "official checkpoint/ folder."
    )


def _fetch_clip(file: WeightsFile, weights_dir: Path, preset: str) -> Path:
    """Through open_clip's registry, into a scratch folder next to the target so the final move is a rename."""
    import open_clip

    import model.clip  # noqa: F401  (registers the project's own architectures with open_clip)

    cfg = open_clip.get_pretrained_cfg(file.clip_model, file.clip_tag)
    if not cfg:
        raise ValueError(f"open_clip has no pretrained weights {file.clip_model!r} / {file.clip_tag!r}")
    clip_dir = weights_dir / CLIP_SUBDIR
    clip_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".download-", suffix=PARTIAL_SUFFIX, dir=weights_dir))
    what = f"the CLIP weights {file.clip_model} / {file.clip_tag}"
    try:
        try:
            downloaded = open_clip.download_pretrained(cfg, cache_dir=str(scratch))
        except Exception as exc:  # urllib, huggingface_hub and open_clip each raise their own kinds
            raise _download_failed(what, _clip_source(cfg), exc, preset, weights_dir) from exc
        if not downloaded:
            raise WeightsDownloadError(f"open_clip's registry entry for {what} names no download")
        blob = Path(downloaded).resolve()
        sha256 = _check_hub_blob(blob, what)
        suffix = Path(downloaded).suffix
        target = clip_dir / f"{clip_checkpoint_stem(file.clip_model, file.clip_tag)}{suffix}"
        os.replace(blob, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _record(weights_dir, target.relative_to(weights_dir).as_posix(), target, _clip_source(cfg), sha256)
    return target


def _check_hub_blob(blob: Path, what: str) -> str | None:
    """A Hugging Face Hub cache stores an LFS file as `blobs/<sha256 of its content>`: hold it to that,
    and return the verified sha256 (None for other sources: URL downloads with a known sha256 are
    checked by open_clip itself)."""
    if blob.parent.name != "blobs" or not SHA256_NAME.fullmatch(blob.name):
        return None
    actual = sha256_file(blob)
    if actual != blob.name:
        raise WeightsDownloadError(
            f"{what} do not match the hub's checksum (sha256 {actual}, expected {blob.name}); "
            "nothing was stored. Try again."
        )
    return actual


def _clip_source(cfg: dict) -> str:
    if cfg.get("hf_hub"):
        return f"hf-hub:{cfg['hf_hub']}"
    return cfg.get("url", "")


def _download_failed(what: str, source: str, exc: BaseException, preset: str, weights_dir: Path):
    return WeightsDownloadError(
        f"downloading {what} from {source} failed: {_reason(exc)}.\n"
        f"To fix: run `fer weights download {preset}` on a machine with internet access and copy its "
        f"weights folder here, or copy the files into {weights_dir}/ under the names `fer weights list` "
        f"shows. Set {MIRROR_ENV} to fetch the projections from a mirror (HF_ENDPOINT does the same for "
        "the Hugging Face Hub)."
    )


def _reason(exc: BaseException) -> str:
    """A short cause: 'no network' for the usual offline errors, else the error's first line."""
    seen: BaseException | None = exc
    for _ in range(10):  # an exception chain, followed a few links deep
        if seen is None:
            break
        if isinstance(seen, urllib.error.HTTPError):
            return f"the server answered HTTP {seen.code} {seen.reason}"
        cause = getattr(seen, "reason", None) if isinstance(seen, urllib.error.URLError) else seen
        if isinstance(cause, socket.gaierror):
            return "no network (the host name does not resolve)"
        if isinstance(cause, ConnectionError | TimeoutError):
            return f"no network connection ({cause})"
        seen = seen.__cause__ or seen.__context__
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---- the `fer weights` commands -----------------------------------------------------------------------
def add_commands(sub: argparse._SubParsersAction) -> None:
    weights = sub.add_parser("weights", help="download, list and verify model weight files")
    commands = weights.add_subparsers(dest="weights_command", required=True, metavar="ACTION")

    p = commands.add_parser("download", help="fetch a preset's weights into the weights folder")
    p.add_argument("presets", nargs="*", metavar="PRESET", help="default: FER_PRESET")
    _dir_option(p)
    p.add_argument(
        "--mirror",
        default=None,
        help=f"base URL (http, https or file) holding the official projection files (default: ${MIRROR_ENV}, "
        "else the official repository)",
    )
    p.set_defaults(handler=cmd_download)

    p = commands.add_parser("list", help="show each preset's files, what is present, and sizes")
    _dir_option(p)
    p.set_defaults(handler=cmd_list)

    p = commands.add_parser("verify", help="re-check present files; exit 1 on a mismatch")
    p.add_argument("presets", nargs="*", metavar="PRESET", help="default: all presets")
    _dir_option(p)
    p.set_defaults(handler=cmd_verify)


def _dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir", type=Path, default=None, help="weights folder (default: FER_WEIGHTS_DIR or weights)"
    )


def _settings():
    from model.config import ModelSettings

    return ModelSettings()


def _weights_dir(args: argparse.Namespace) -> Path:
    return args.dir if args.dir is not None else _settings().weights_dir


def cmd_download(args: argparse.Namespace) -> int:
    weights_dir = _weights_dir(args)
    presets = args.presets or [_settings().preset]
    mirror = args.mirror or mirror_from_env()
    if not args.verbose:
        _quiet_hub_client()
    for name in presets:
        files = preset_files(name, mirror)
        if not files:
            print(f"{name}: needs no weight files (random weights)")
        for file in files:
            print(f"{name}: {file.kind} from {file.source}", flush=True)
            try:
                path, fetched = ensure(file, weights_dir, name)
            except WeightsDownloadError as exc:
                print(f"fer weights: {exc}", file=sys.stderr)
                return 1
            size = _size(path.stat().st_size)
            print(f"  {'downloaded and verified' if fetched else 'already present'}: {path} ({size})")
    return 0


def _quiet_hub_client() -> None:
    """The hub client logs each of its retries; the one error message `download` prints says it all."""
    try:
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:
        return
    hub_logging.set_verbosity_error()


def cmd_list(args: argparse.Namespace) -> int:
    weights_dir = _weights_dir(args)
    print(f"weights folder: {weights_dir.resolve()}")
    rows = [("PRESET", "FILE", "STATUS")]
    for name in PRESETS:
        files = preset_files(name)
        if not files:
            rows.append((name, "(none: random weights)", "-"))
        for file in files:
            path = locate(file, weights_dir)
            if path is None:
                rows.append((name, file.relpath, "missing"))
            else:
                rows.append(
                    (name, path.relative_to(weights_dir).as_posix(), f"present {_size(path.stat().st_size)}")
                )
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    for row in rows:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    weights_dir = _weights_dir(args)
    seen: set[str] = set()
    bad = checked = 0
    for name in args.presets or list(PRESETS):
        for file in preset_files(name):
            path = locate(file, weights_dir)
            if path is None or str(path) in seen:  # presets share CLIP files: hash each once
                continue
            seen.add(str(path))
            state = check_file(file, weights_dir)
            checked += 1
            bad += not state.ok
            print(f"{'ok ' if state.ok else 'BAD'}  {state.path}: {state.detail}")
    if not checked:
        print(f"no weight files to verify in {weights_dir}")
    if bad:
        print(
            f"fer weights: {bad} file(s) do not verify: run `fer weights download PRESET` to replace them",
            file=sys.stderr,
        )
    return 1 if bad else 0


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
