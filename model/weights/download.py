"""Getting a preset's files into the weights folder, verified before they count as present.

- CLIP weights come through open_clip's own registry (`get_pretrained_cfg` + `download_pretrained`),
  into a temporary folder inside the weights folder, and land at `clip/<model>__<tag><suffix>`.
  open_clip checks the sha256 of URL downloads that carry one; a Hugging Face Hub download is checked
  here against the hub's own id for it (an LFS file's cache blob is named by its sha256).
- The official Exp-CLIP projections come from the official repository at the pinned commit (or from a
  mirror) and are checked against their git blob ids, so the host need not be trusted.
Every file is written under a `.partial` name and renamed only after it verified, so a broken download
never looks complete; a file that is present and verifies is not fetched again.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager, suppress
from pathlib import Path

from model.files import PARTIAL_SUFFIX, human_size, sha256_file
from model.registry import CLIP_SUBDIR, clip_checkpoint_stem, open_clip_models
from model.weights.store import WeightsFile, check_file, git_blob_sha1, record

log = logging.getLogger(__name__)

MIRROR_SETTING = "FER_WEIGHTS_MIRROR"
TIMEOUT_S = 60
PROBE_TIMEOUT_S = 5  # a host that does not answer this first connection is taken for unreachable
# An official projection is 8-12 MiB: a mirror sending more is wrong, and is stopped before it fills
# the disk (the blob id can only be checked once the file is whole).
MAX_PROJECTION_BYTES = 64 << 20
CHUNK = 1 << 20
SHA256_NAME = re.compile(r"[0-9a-f]{64}")


class WeightsDownloadError(RuntimeError):
    """A download that failed or did not verify; the message says why and what to do."""


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
    what = f"the projection {target.name}"
    _check_reachable(file.url, what, file.url, preset, weights_dir)
    with _new_folder(target.parent):
        partial = target.with_name(target.name + PARTIAL_SUFFIX)
        try:
            try:
                _download_url(file.url, partial, MAX_PROJECTION_BYTES)
            except (OSError, ValueError) as exc:
                raise _download_failed(what, file.url, exc, preset, weights_dir) from exc
            actual = git_blob_sha1(partial)
            if actual != file.blob_sha1:
                raise WeightsDownloadError(
                    f"{file.url} does not match the official release (git blob id {actual}, expected "
                    f"{file.blob_sha1}); nothing was stored. The download or the mirror is corrupt: try "
                    f"again, or point {MIRROR_SETTING} at a copy of the official checkpoint/ folder."
                )
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
    record(weights_dir, file.relpath, target, file.url)
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
        f"{url} is larger than any official projection (over {human_size(max_bytes)}): the download was "
        f"stopped and nothing was stored. The mirror is wrong: point {MIRROR_SETTING} at a copy of the "
        "official checkpoint/ folder."
    )


def _fetch_clip(file: WeightsFile, weights_dir: Path, preset: str) -> Path:
    """Through open_clip's registry, into a scratch folder next to the target so the final move is a rename."""
    open_clip = open_clip_models()

    cfg = open_clip.get_pretrained_cfg(file.clip_model, file.clip_tag)
    if not cfg:
        raise ValueError(f"open_clip has no pretrained weights {file.clip_model!r} / {file.clip_tag!r}")
    what = f"the CLIP weights {file.clip_model} / {file.clip_tag}"
    host = f"{hub_endpoint()}/{cfg['hf_hub']}" if cfg.get("hf_hub") else cfg.get("url", "")
    _check_reachable(host, what, _clip_source(cfg), preset, weights_dir)
    with _new_folder(weights_dir):
        scratch = Path(tempfile.mkdtemp(prefix=".download-", suffix=PARTIAL_SUFFIX, dir=weights_dir))
        try:
            try:
                downloaded = open_clip.download_pretrained(cfg, cache_dir=str(scratch))
            except Exception as exc:  # urllib, huggingface_hub and open_clip each raise their own kinds
                raise _download_failed(what, _clip_source(cfg), exc, preset, weights_dir) from exc
            if not downloaded:
                raise WeightsDownloadError(f"open_clip's registry entry for {what} names no download")
            blob = Path(downloaded).resolve()
            sha256 = _check_hub_blob(blob, what)
            stem = clip_checkpoint_stem(file.clip_model, file.clip_tag)
            target = weights_dir / CLIP_SUBDIR / f"{stem}{Path(downloaded).suffix}"
            target.parent.mkdir(exist_ok=True)
            os.replace(blob, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    record(weights_dir, target.relative_to(weights_dir).as_posix(), target, _clip_source(cfg), sha256)
    return target


def hub_endpoint() -> str:
    """The Hugging Face Hub the hub client talks to (HF_ENDPOINT, read by the client itself)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def _check_reachable(url: str, what: str, source: str, preset: str, weights_dir: Path) -> None:
    """One connection to the source's host (or its proxy) before any download, bounded by
    PROBE_TIMEOUT_S: offline, the hub client retries each file for about a minute before it gives up."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return  # a file:// mirror, or a source open_clip names otherwise: nothing to probe
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    failure = _connect(parts.hostname, port)
    if failure is not None:
        raise _download_failed(what, source, failure, preset, weights_dir) from failure


def _connect(host: str, port: int) -> OSError | None:
    """Why `host:port` cannot be reached, or None. In a thread, so that a resolver that hangs (no
    answer rather than a refusal) is bounded by the same deadline as the connection."""
    outcome: list[OSError | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=attempt, name="fer-weights-probe", daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    return outcome[0] if outcome else TimeoutError(f"{host} did not answer within {PROBE_TIMEOUT_S} s")


@contextmanager
def _new_folder(path: Path):
    """`path`, made with its parents; when the work inside fails, the folders made here that are still
    empty are removed again, so a failed download leaves no empty `weights/clip/` behind."""
    made = [folder for folder in (path, *path.parents) if not folder.exists()]
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for folder in made:  # the deepest first
            with suppress(OSError):
                folder.rmdir()
        raise


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
        f"shows. Set {MIRROR_SETTING} to fetch the projections from a mirror (HF_ENDPOINT does the same for "
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


