"""Faces pasted at known places on synthetic canvases: how a face detector is measured (bench.faces'
recall figures) and checked (tests/test_faces.py). Nothing in the service uses it."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from model.faces.base import Box

IOU_MATCH = 0.3  # a detection finds a face when their boxes overlap at least this much


@dataclass(frozen=True)
class SourceFace:
    """A face cut from a frame with some context; `box` is its reference box inside `patch`."""

    patch: Image.Image
    box: tuple[float, float, float, float]  # x, y, w, h


def background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Smooth noise, mostly grey with some colour, plus finer texture: a scene with edges but no faces."""
    width, height = size
    layers = np.zeros((height, width, 3), dtype=np.float32)
    for cells, weight in ((4, 70.0), (16, 35.0), (64, 15.0)):
        grey = rng.normal(0, 1, (cells, cells, 1))
        colour = rng.normal(0, 0.4, (cells, cells, 3))
        noise = (grey + colour).astype(np.float32)
        layers += weight * cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
    return Image.fromarray(np.clip(128 + layers, 0, 255).astype(np.uint8))


def paste_face(
    canvas: Image.Image,
    source: SourceFace,
    width: float,
    angle: float,
    mirror: bool,
    center: tuple[float, float],
) -> Box:
    """Pastes `source` scaled so its reference box is `width` wide, mirrored, rotated by `angle` degrees
    (counter-clockwise) about the box centre placed at `center`; returns the face's box on the canvas:
    the reference box's size, centred where its centre landed."""
    x, y, w, h = source.box
    scale = width / w
    patch = source.patch
    if mirror:
        patch = patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = patch.width - x - w
    size = (max(1, round(patch.width * scale)), max(1, round(patch.height * scale)))
    patch = patch.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
    cx, cy = (x + w / 2) * scale, (y + h / 2) * scale
    mask = Image.new("L", patch.size, 255)
    if angle:
        # About the face centre, so the face stays where `center` puts it; the patch's corners are cut.
        patch = patch.rotate(angle, resample=Image.Resampling.BICUBIC, center=(cx, cy), expand=False)
        mask = mask.rotate(angle, resample=Image.Resampling.BILINEAR, center=(cx, cy), expand=False)
    canvas.paste(patch, (round(center[0] - cx), round(center[1] - cy)), mask)
    fw, fh = w * scale, h * scale
    return Box(round(center[0] - fw / 2), round(center[1] - fh / 2), round(fw), round(fh))


def iou(a: Box, b: Box) -> float:
    ix = max(0, min(a.x + a.w, b.x + b.w) - max(a.x, b.x))
    iy = max(0, min(a.y + a.h, b.y + b.h) - max(a.y, b.y))
    inter = ix * iy
    union = a.area + b.area - inter
    return inter / union if union else 0.0


def match(truths: list[Box], found: list[Box]) -> tuple[list[bool], int]:
    """Greedy one-to-one matching by IoU: which truths were found, and how many detections are stray."""
    pairs = sorted(
        ((iou(t, f), i, j) for i, t in enumerate(truths) for j, f in enumerate(found)), reverse=True
    )
    hit, used = [False] * len(truths), [False] * len(found)
    for overlap, i, j in pairs:
        if overlap < IOU_MATCH:
            break
        if not hit[i] and not used[j]:
            hit[i] = used[j] = True
    return hit, used.count(False)
