"""Decoding images and videos into PIL frames, within limits that keep one bad file from eating memory.

Video frames are sampled by the 16-segment middle-frame rule (docs/method.md) and only the
sampled frames are converted; a long clip is read by seeking to each sampled timestamp (decoding
from the key frame before it), so the work grows with the number of samples, not the clip's length.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

Source = str | Path | bytes | BinaryIO

VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".gif", ".mpg", ".mpeg", ".wmv", ".flv"}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
# The formats Pillow may read. Not every format Pillow knows: EPS would run Ghostscript on an upload
# where it is installed, and rare readers (DDS, ...) are where malformed files find odd failures.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")  # JPEG covers MPO (camera JPEGs)

# Clips with at most this many frames are decoded straight through (dropping unsampled frames);
# longer ones seek. Seeking costs a key-frame decode per sample, so it only pays off on long clips.
SEQUENTIAL_MAX_FRAMES = 600
# Two sampled frames closer than this are reached by decoding forward rather than seeking again.
SEEK_MIN_GAP_S = 2.0
# Sampled frames are converted no larger than this (longest side): the encoder needs 224-336 px and face
# detection 480, and 64 full 4K frames would hold ~1.8 GB per request.
MAX_FRAME_SIDE = 960
# Images and frames whose long side is more than this many times the short side are refused: no face
# photo is shaped so, and the `clip` preprocessing scales the short side up to the model's input (a
# 1,243-byte 400000x1 PNG would have become a 89,600,000x224 image).
MAX_ASPECT_RATIO = 100


class MediaError(ValueError):
    """A file that is not decodable media; the message is one sentence for a user."""


class MediaTooLarge(MediaError):
    """Decodable in principle, but over a limit (pixels, frames, duration): refused before decoding."""


class WrongMediaKind(MediaError):
    """A video where an image was expected, or the reverse; `kind` is what the file is."""

    def __init__(self, kind: str):
        what = "a video, not an image" if kind == "video" else "a still image, not a video"
        super().__init__(f"the file is {what}")
        self.kind = kind


@dataclass(frozen=True)
class MediaLimits:
    max_image_pixels: int = 50_000_000  # a 7000x7000 photo; PIL's own bomb guard is 89M (warning)
    max_video_pixels: int = 4096 * 2304  # per frame: 4K DCI-ish
    max_video_seconds: float = 4 * 3600
    max_video_frames: int = 1_000_000


DEFAULT_LIMITS = MediaLimits()


def is_video_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def _open_bytes(source: Source) -> BinaryIO | str:
    if isinstance(source, bytes):
        return io.BytesIO(source)
    if isinstance(source, Path):
        return str(source)
    return source


def open_image(source: Source) -> Image.Image:
    """Pillow's lazy open (the header only), limited to IMAGE_FORMATS."""
    return Image.open(_open_bytes(source), formats=IMAGE_FORMATS)


def decode_image(source: Source, limits: MediaLimits = DEFAULT_LIMITS) -> Image.Image:
    """An image in one of IMAGE_FORMATS -> RGB, EXIF orientation applied; an animated image gives its
    first frame. The pixel count is checked from the header, before the pixels are decoded.

    Pillow's readers raise many kinds of exception on malformed files (SyntaxError, struct.error,
    EOFError, IndexError, NotImplementedError, ...): any of them is the file's fault, a MediaError."""
    try:
        image = open_image(source)
    except Image.DecompressionBombError as exc:  # Pillow's own guard, for headers past ~179M pixels
        raise MediaTooLarge(f"image is over the pixel limit: {exc}") from None
    except UnidentifiedImageError:
        if is_video(source):
            raise WrongMediaKind("video") from None
        raise MediaError("not a decodable image") from None
    except MemoryError:
        raise
    except Exception as exc:
        raise MediaError(f"cannot read the image: {exc}") from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise MediaTooLarge(
            f"image is {width}x{height} = {width * height:,} pixels, over the limit of {limits.max_image_pixels:,}"
        )
    if width == 0 or height == 0:
        raise MediaError("image has zero size")
    _check_shape("the image", width, height)
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of the decoded image
        return image if image.mode == "RGB" else image.convert("RGB")
    except MemoryError:
        raise
    except Exception as exc:
        raise MediaError(f"image data is truncated or corrupt: {exc}") from None


def is_video(source: Source) -> bool:
    """Whether FFmpeg reads the file as a moving video (more than one frame, or a known duration)."""
    if hasattr(source, "seek"):
        source.seek(0)
    try:
        with av.open(_open_bytes(source), mode="r", options={"protocol_whitelist": _protocols(source)}) as c:
            if not c.streams.video:
                return False
            if c.format.name == "image2" or c.format.name.endswith("_pipe"):  # a still image format
                return False
            stream = c.streams.video[0]
            return (stream.frames or 0) > 1 or bool(stream.duration or c.duration)
    except (av.FFmpegError, OSError, ValueError):
        return False
    finally:
        if hasattr(source, "seek"):
            source.seek(0)


def is_still_image(source: BinaryIO, declared_type: str | None = None) -> bool:
    """Whether an upload is a still image (a one-frame clip for retrieval) rather than a video or an
    animated GIF; from its declared type when that says video, else from its header."""
    declared = (declared_type or "").lower()
    if declared.startswith("video/") or declared.startswith("image/gif"):
        return False
    try:
        with open_image(source) as image:  # reads the header only
            return not getattr(image, "is_animated", False)
    except MemoryError:
        raise
    except Exception:  # any reader failure (see decode_image)
        return False  # not an image we can open: the video path decides (and reports) what it is
    finally:
        source.seek(0)


def _check_shape(what: str, width: int, height: int) -> None:
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise MediaError(f"{what} is {width}x{height}: one side is over {MAX_ASPECT_RATIO} times the other")


def existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MediaError("no such file")
    return path


def read_frames(
    path: str | Path, frames: int = 16, limits: MediaLimits = DEFAULT_LIMITS
) -> list[Image.Image]:
    """A video's sampled frames, or an image as a one-frame clip, chosen by the file's extension."""
    path = existing_file(path)
    if is_video_path(path):
        return read_video(path, frames, limits).frames
    return [decode_image(path, limits)]


def sample_frame_indices(n_frames: int, count: int = 16) -> list[int]:
    """The official rule: `count` equal segments, the middle frame of each: int(tick/2 + tick*i).

    For clips shorter than `count` frames the same formula gives each frame about count/n times,
    evenly spread in time (e.g. 8 frames -> 0,0,1,1,...,7,7), rather than the official loader's
    repetition of frame 0; so every frame of a short clip counts equally."""
    if n_frames <= 0:
        raise ValueError("a clip needs at least one frame")
    if count <= 0:
        raise ValueError("count must be positive")
    tick = n_frames / count
    return [min(int(tick / 2 + tick * i), n_frames - 1) for i in range(count)]


@dataclass
class VideoFrames:
    frames: list[Image.Image]  # one per sampled index, in order (repeats allowed)
    indices: list[int]
    timestamps: list[float]  # seconds from the clip's start
    n_frames: int
    fps: float
    duration: float
    decoded: int = 0  # frames the decoder produced: what the sampling cost


def read_video(source: Source, count: int = 16, limits: MediaLimits = DEFAULT_LIMITS) -> VideoFrames:
    try:
        container = av.open(_open_bytes(source), mode="r", options={"protocol_whitelist": _protocols(source)})
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"not a decodable video: {_first_line(exc)}") from None
    try:
        return _read_frames(container, count, limits)
    except av.FFmpegError as exc:
        raise MediaError(f"video data is corrupt: {_first_line(exc)}") from None
    finally:
        container.close()


def _protocols(source: Source) -> str:
    """What FFmpeg may open. A file can name further resources: an SDP file binds the UDP ports it
    names and waits on them, a playlist fetches URLs, an ffconcat list reads local files. An upload
    (bytes, a stream) may open nothing beyond itself ("none" names no protocol); a local path may be
    read from disk."""
    return "file" if isinstance(source, str | Path) else "none"


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _read_frames(container, count: int, limits: MediaLimits) -> VideoFrames:
    if not container.streams.video:
        raise MediaError("the file has no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:  # FFmpeg has no decoder for the stream's codec
        raise MediaError("the video's codec is not supported")
    stream.thread_type = "AUTO"
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > limits.max_video_pixels:
        raise MediaTooLarge(
            f"video frames are {width}x{height}, over the limit of {limits.max_video_pixels:,} pixels"
        )
    rate = stream.average_rate or stream.guessed_rate or Fraction(25)
    fps = float(rate)
    duration = _duration_s(container, stream)
    if duration > limits.max_video_seconds:
        raise MediaTooLarge(
            f"video lasts {duration:.0f} s, over the limit of {limits.max_video_seconds:.0f} s"
        )
    n_frames = stream.frames or _count_packets(container, stream, limits.max_video_frames)
    if n_frames > limits.max_video_frames:
        raise MediaTooLarge(f"video has {n_frames:,} frames, over the limit of {limits.max_video_frames:,}")
    if n_frames <= 0:
        raise MediaError("the video has no frames")
    indices = sample_frame_indices(n_frames, count)
    if n_frames <= SEQUENTIAL_MAX_FRAMES or container.format.name == "gif":
        picked, decoded = _decode_sequential(container, stream, set(indices))
    else:
        picked, decoded = _decode_seeking(container, stream, sorted(set(indices)), fps)
    if not picked:
        raise MediaError("no frame of the video could be decoded")
    frames, times = _fill(indices, picked)
    return VideoFrames(frames, indices, times, n_frames, fps, duration, decoded)


def _duration_s(container, stream) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return 0.0


def _count_packets(container, stream, limit: int) -> int:
    """Frame count for containers that do not store it (webm, some avi): demux only, no decoding."""
    n = 0
    for packet in container.demux(stream):
        if packet.size:
            n += 1
            if n > limit:
                break
    container.seek(0)
    return n


def _decode_sequential(container, stream, wanted: set[int]) -> tuple[dict[int, tuple], int]:
    picked, last = {}, max(wanted)
    decoded = 0
    for index, frame in enumerate(container.decode(stream)):
        decoded += 1
        if index in wanted:
            picked[index] = (_to_image(frame), _time(frame, index, stream))
        if index >= last:
            break
    return picked, decoded


def _decode_seeking(container, stream, wanted: list[int], fps: float) -> tuple[dict[int, tuple], int]:
    start = _start_s(stream)
    picked, decoded = {}, 0
    frames = None
    position = None  # time of the last decoded frame
    for index in wanted:
        target = start + index / fps
        if frames is None or position is None or target - position > SEEK_MIN_GAP_S or target < position:
            container.seek(int(target / stream.time_base), stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
        for frame in frames:
            decoded += 1
            position = frame.time if frame.time is not None else position
            if position is not None and position >= target - 0.5 / fps:
                picked[index] = (_to_image(frame), position - start)
                break
        else:
            break  # past the end: the remaining indices are filled from the last frame found
    return picked, decoded


def _to_image(frame) -> Image.Image:
    _check_shape("a video frame", frame.width, frame.height)
    scale = MAX_FRAME_SIDE / max(frame.width, frame.height)
    if scale >= 1:
        return frame.to_image()
    return frame.to_image(width=round(frame.width * scale), height=round(frame.height * scale))


def _start_s(stream) -> float:
    return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def _time(frame, index: int, stream) -> float:
    if frame.time is not None:
        return frame.time - _start_s(stream)
    rate = stream.average_rate or Fraction(25)
    return index / float(rate)


def _fill(indices: list[int], picked: dict[int, tuple]) -> tuple[list[Image.Image], list[float]]:
    """Sampled indices the decoder never reached (a frame count that over-promised) take the
    nearest decoded frame."""
    available = sorted(picked)
    frames, times = [], []
    for index in indices:
        nearest = index if index in picked else min(available, key=lambda a: abs(a - index))
        image, t = picked[nearest]
        frames.append(image)
        times.append(t)
    return frames, times
