"""The CPU stage of a request, run in the decode thread pool: decode -> faces -> crops -> uint8 tensors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import BinaryIO

import torch

from model.engine import FerEngine
from model.media import MediaLimits, VideoFrames, decode_image, open_image, read_video
from service.faces import Box, crop_face, detect_faces


@dataclass
class PreparedImage:
    pixels: torch.Tensor  # [faces or 1, 3, S, S] uint8
    boxes: list[Box]  # empty: no face found (or detection off), pixels hold the whole image


@dataclass
class PreparedVideo:
    pixels: torch.Tensor  # [frames, 3, S, S] uint8
    clip: VideoFrames  # the sampling facts (indices, timestamps, fps...); its frames are dropped
    face_found: list[bool]  # per sampled frame


def prepare_image(
    engine: FerEngine, source: BinaryIO, limits: MediaLimits, detect: bool, max_faces: int, margin: float
) -> PreparedImage:
    image = decode_image(source, limits)
    boxes = detect_faces(image, max_faces) if detect else []
    crops = [crop_face(image, box, margin) for box in boxes] or [image]
    return PreparedImage(engine.prepare_many(crops), boxes)


def prepare_video(
    engine: FerEngine, source: BinaryIO, limits: MediaLimits, frames: int, detect: bool, margin: float
) -> PreparedVideo:
    """Each sampled frame becomes its largest face's crop, or the whole frame when none is found."""
    clip = read_video(source, frames, limits)
    crops, found = [], []
    for frame in clip.frames:
        boxes = detect_faces(frame, 1) if detect else []
        crops.append(crop_face(frame, boxes[0], margin) if boxes else frame)
        found.append(bool(boxes))
    # The decoded frames (up to ~100 MB at 1080p) are not kept while the request waits in the queue.
    return PreparedVideo(engine.prepare_many(crops), dataclasses.replace(clip, frames=[]), found)


def prepare_clip(
    engine: FerEngine,
    source: BinaryIO,
    declared_type: str | None,
    limits: MediaLimits,
    frames: int,
    detect: bool,
    margin: float,
) -> PreparedImage | PreparedVideo:
    """/retrieve's input as a clip: a still image is one frame (its largest face, or the whole image);
    a gif or a video gives its sampled frames."""
    if _is_still_image(source, declared_type):
        return prepare_image(engine, source, limits, detect, 1, margin)
    return prepare_video(engine, source, limits, frames, detect, margin)


def _is_still_image(source: BinaryIO, declared_type: str | None) -> bool:
    declared = (declared_type or "").lower()
    if declared.startswith("video/") or declared.startswith("image/gif"):
        return False
    try:
        with open_image(source) as image:  # reads the header only
            return not getattr(image, "is_animated", False)
    except MemoryError:
        raise
    except Exception:  # any reader failure (see decode_image)
        return False  # not a still image we can open: the video path decides (and reports) what it is
    finally:
        source.seek(0)
