"""Decoding images and videos into PIL frames, within limits that keep one bad file from eating memory.

Video frames are sampled by the 16-segment middle-frame rule (docs/method.md) and only the
sampled frames are converted; a long clip is read by seeking to each sampled timestamp (decoding
from the key frame before it), so the work grows with the number of samples, not the clip's length.
"""

from __future__ import annotations

import bisect
import io
import logging
import threading
import time
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
SEEK_MIN_FRAMES = 50
# Sampled frames are converted no larger than this (longest side): the encoder needs 224-336 px and face
# detection up to 960 (the small faces of a group), and 64 full 4K frames would hold ~1.8 GB per request.
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
    # What one request's decoding may cost, whatever the file's size: a small file can describe a huge
    # canvas or thousands of frames to decode before the sampled ones.
    max_decode_frames: int = 5000
    max_decode_megapixels: float = 10_000.0
    max_decode_seconds: float = 60.0


class DecodeStopped(Exception):
    """Decoding was stopped from outside (the client left, or the service is stopping); nobody will read
    the frames."""


class DecodeBudget:
    """One request's decoding: frames and pixels counted against the limits as they are decoded, the
    wall time against its deadline, and a stop signal checked on the way."""

    def __init__(self, limits: MediaLimits, stop: threading.Event | None = None):
        self.limits = limits
        self.stop = stop
        self.deadline = time.monotonic() + limits.max_decode_seconds
        self.frames = 0
        self.pixels = 0

    def plan(self, frames: int, pixels_per_frame: int) -> None:
        """Refuses, before decoding starts, a plan that would spend the budget."""
        self._check(frames, frames * pixels_per_frame, planned=True)

    def charge(self, pixels: int) -> None:
        """One decoded frame."""
        self.frames += 1
        self.pixels += pixels
        self._check(self.frames, self.pixels, planned=False)
        if self.stop is not None and self.stop.is_set():
            raise DecodeStopped()
        if time.monotonic() > self.deadline:
            raise MediaTooLarge(
                f"decoding took longer than {self.limits.max_decode_seconds:g} s (FER_MAX_DECODE_SECONDS)"
            )

    def _check(self, frames: int, pixels: int, planned: bool) -> None:
        verb = "needs" if planned else "took"
        if frames > self.limits.max_decode_frames:
            raise MediaTooLarge(
                f"sampling this video {verb} decoding {frames:,} frames, over the limit of "
                f"{self.limits.max_decode_frames:,} (FER_MAX_DECODE_FRAMES)"
            )
        if pixels > self.limits.max_decode_megapixels * 1e6:
            raise MediaTooLarge(
                f"sampling this video {verb} decoding {pixels / 1e6:,.0f} megapixels, over the limit of "
                f"{self.limits.max_decode_megapixels:,.0f} (FER_MAX_DECODE_MEGAPIXELS)"
            )


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
    except Image.DecompressionBombError:  # Pillow's own guard, for headers past ~179M pixels
        raise MediaTooLarge(f"the image is over the limit of {limits.max_image_pixels:,} pixels") from None
    except UnidentifiedImageError:
        if is_video(source):
            raise WrongMediaKind("video") from None
        raise MediaError("not a decodable image") from None
    except MemoryError:
        raise
    except Exception as exc:
        raise MediaError("the image's header is corrupt") from exc  # the reader's own words: for the log
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
        raise MediaError("the image data is truncated or corrupt") from exc


def is_video(source: Source) -> bool:
    """Whether FFmpeg reads the file as a moving video (more than one frame, or a known duration)."""
    if hasattr(source, "seek"):
        source.seek(0)
    try:
        with av.open(_open_bytes(source), mode="r", options={"protocol_whitelist": _protocols(source)}) as c:
            if not c.streams.video or _is_still_image_format(c):
                return False
            stream = c.streams.video[0]
            return (stream.frames or 0) > 1 or bool(stream.duration or c.duration)
    except (av.FFmpegError, OSError, ValueError):
        return False
    finally:
        if hasattr(source, "seek"):
            source.seek(0)


def _is_still_image_format(container) -> bool:
    """Whether FFmpeg opened the file with a still-image demuxer (JPEG, PNG, ... read as one frame)."""
    return container.format.name == "image2" or container.format.name.endswith("_pipe")


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
    # The clip's own frame size (width, height): `frames` may be scaled down from it (MAX_FRAME_SIDE).
    size: tuple[int, int] = (0, 0)


def read_video(
    source: Source, count: int = 16, limits: MediaLimits = DEFAULT_LIMITS, stop: threading.Event | None = None
) -> VideoFrames:
    """`count` frames sampled by the middle-frame rule, within the decode budget of `limits`; `stop`
    (set from another thread) ends the decoding early with DecodeStopped."""
    try:
        container = av.open(_open_bytes(source), mode="r", options={"protocol_whitelist": _protocols(source)})
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise MediaError("not a decodable video") from exc
    try:
        return _read_frames(container, count, limits, DecodeBudget(limits, stop))
    except av.FFmpegError as exc:
        raise MediaError("the video data is corrupt") from exc
    finally:
        container.close()


def _protocols(source: Source) -> str:
    """What FFmpeg may open. A file can name further resources: an SDP file binds the UDP ports it
    names and waits on them, a playlist fetches URLs, an ffconcat list reads local files. An upload
    (bytes, a stream) may open nothing beyond itself ("none" names no protocol); a local path may be
    read from disk."""
    return "file" if isinstance(source, str | Path) else "none"


def _read_frames(container, count: int, limits: MediaLimits, budget: DecodeBudget) -> VideoFrames:
    if not container.streams.video:
        raise MediaError("the file has no video stream")
    if _is_still_image_format(container):  # FFmpeg reads a photo as a one-frame clip: it is an image
        raise WrongMediaKind("image")
    stream = container.streams.video[0]
    if stream.codec_context is None:  # FFmpeg has no decoder for the stream's codec
        raise MediaError("the video's codec is not supported")
    stream.thread_type = "AUTO"
    # The declared size is the first frame's: a stream may change size at any frame (MJPEG, a new H.264
    # SPS), so each decoded frame is checked and charged at its own size (`_decode`). FFmpeg refuses to
    # allocate a frame past `max_pixels`; it counts the width rounded up to its stride alignment, hence
    # the headroom over the exact limit checked here.
    stream.codec_context.options = {"max_pixels": str(2 * limits.max_video_pixels)}
    width, height = stream.codec_context.width, stream.codec_context.height
    _check_pixels("video frames are", width, height, limits.max_video_pixels)
    rate = stream.average_rate or stream.guessed_rate or Fraction(25)
    fps = float(rate)
    duration = _duration_s(container, stream)
    if duration > limits.max_video_seconds:
        raise MediaTooLarge(
            f"video lasts {duration:.0f} s, over the limit of {limits.max_video_seconds:.0f} s"
        )
    keyframes, n_frames = _index(container, stream, limits.max_video_frames)
    if n_frames > limits.max_video_frames:
        raise MediaTooLarge(f"video has {n_frames:,} frames, over the limit of {limits.max_video_frames:,}")
    if n_frames <= 0:
        raise MediaError("the video has no frames")
    indices = sample_frame_indices(n_frames, count)
    # A GIF's frames build on the ones before them: it is only decoded straight through.
    seekable = container.format.name != "gif" and n_frames > SEQUENTIAL_MAX_FRAMES
    spans = plan_decoding(sorted(set(indices)), keyframes if seekable else [0])
    budget.plan(sum(stop - start + 1 for start, stop in spans), width * height)
    picked = _decode(container, stream, spans, set(indices), fps, budget)
    if not picked:
        raise MediaError("no frame of the video could be decoded")
    frames, times = _fill(indices, picked)
    size = (width, height) if width and height else frames[0].size
    return VideoFrames(frames, indices, times, n_frames, fps, duration, budget.frames, size)


def _duration_s(container, stream) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return 0.0


def _index(container, stream, limit: int) -> tuple[list[int], int]:
    """The key frames' positions (frame indices, presentation order) and the frame count, from the
    packets alone (demuxing, no decoding)."""
    times, keys = [], []
    for packet in container.demux(stream):
        if packet.size:
            times.append(packet.pts if packet.pts is not None else packet.dts or 0)
            keys.append(packet.is_keyframe)
            if len(times) > limit:
                break
    container.seek(0)
    order = sorted(range(len(times)), key=times.__getitem__)  # decode order -> presentation order
    keyframes = sorted({rank for rank, packet in enumerate(order) if keys[packet]} | {0})
    return keyframes, len(times)


def plan_decoding(wanted: list[int], keyframes: list[int]) -> list[tuple[int, int]]:
    """Where decoding starts for each stretch and the last wanted frame it reaches: (start, stop) frame
    indices, in order. The decoder moves forward only; it jumps to a key frame when one lies ahead of
    where it is and before the next wanted frame (and far enough ahead to be worth the seek), so no
    stretch is decoded twice, however sparse the key frames are."""
    spans: list[list[int]] = []
    position = -1  # the last frame decoded
    for index in wanted:
        key = keyframes[bisect.bisect_right(keyframes, index) - 1]
        if not spans or (key > position + 1 and index - position > SEEK_MIN_FRAMES):
            spans.append([key, index])
        else:
            spans[-1][1] = index
        position = index
    return [(start, stop) for start, stop in spans]


def _decode(
    container, stream, spans: list[tuple[int, int]], wanted: set[int], fps: float, budget: DecodeBudget
) -> dict[int, tuple]:
    """Decodes each planned stretch forward and keeps the wanted frames, as images. A stretch that
    starts at a key frame counts its frames from the first one's timestamp; the first stretch starts
    at the beginning and counts from 0, which needs no timestamps at all."""
    origin = _start_s(stream)
    picked: dict[int, tuple] = {}
    for start, stop in spans:
        if start > 0:
            container.seek(int((origin + start / fps) / stream.time_base), stream=stream, backward=True)
        index = None
        for frame in _decoded(container, stream, budget.limits):
            budget.charge(frame.width * frame.height)
            _check_pixels("a video frame is", frame.width, frame.height, budget.limits.max_video_pixels)
            if index is None:
                index = round((frame.time - origin) * fps) if start > 0 and frame.time is not None else start
            else:
                index += 1
            if index in wanted and index not in picked:
                picked[index] = (_to_image(frame), _time(frame, index, stream))
            if index >= stop:
                break
    return picked


def _decoded(container, stream, limits: MediaLimits):
    """The stream's frames from where the container stands. A decoder's EINVAL is reported as a frame over
    the limit: FFmpeg answers so for a frame past `max_pixels` (set in `_read_frames`), while corrupt data
    gets AVERROR_INVALIDDATA (a MediaError from `read_video`)."""
    try:
        yield from container.decode(stream)
    except av.ArgumentError:
        raise MediaTooLarge(
            f"a video frame is over the limit of {limits.max_video_pixels:,} pixels"
        ) from None


def _check_pixels(what: str, width: int, height: int, limit: int) -> None:
    if width * height > limit:
        raise MediaTooLarge(f"{what} {width}x{height}, over the limit of {limit:,} pixels")


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
