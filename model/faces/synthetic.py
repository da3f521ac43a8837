"""Faces pasted at known places on synthetic canvases and clips: how a face detector is measured
(bench.faces' recall figures) and checked (tests/test_faces.py), and how the people of a clip are
tracked (tests/test_tracks.py, the benchmark's several-person clip). Nothing in the service uses it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
from PIL import Image

from model.faces.base import Box

IOU_MATCH = 0.3  # a detection finds a face when their boxes overlap at least this much
# The astronaut's face in scikit-image's data.astronaut() (512x512).
ASTRONAUT_FACE = Box(178, 57, 95, 120)
# A face counts as visible in a clip's frame while no more than this share of it is covered by people in
# front of it: what a detector can be expected to find.
VISIBLE_MAX_COVER = 0.1


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


def astronaut_face(context: float = 0.5) -> SourceFace:
    """The astronaut photo's face (scikit-image's data, a development dependency) with `context` of its
    size around it on every side."""
    from skimage import data

    photo = Image.fromarray(data.astronaut())
    box = ASTRONAUT_FACE
    dx, dy = int(box.w * context), int(box.h * context)
    patch = photo.crop((box.x - dx, box.y - dy, box.x + box.w + dx, box.y + box.h + dy))
    return SourceFace(patch, (dx, dy, box.w, box.h))


def recoloured(source: SourceFace, look: int) -> SourceFace:
    """One face as several people who look apart: look 0 is the face itself, then its colour channels
    swapped, grey, and so on (a detector finds each; an image encoder tells them apart)."""
    looks = ((0, 1, 2), (2, 1, 0), None, (1, 2, 0), (2, 0, 1), (0, 2, 1))
    order = looks[look % len(looks)]
    pixels = np.asarray(source.patch.convert("RGB"))
    if order is None:
        pixels = np.repeat(pixels.mean(axis=2, keepdims=True), 3, axis=2).astype(np.uint8)
    else:
        pixels = pixels[:, :, order]
    return SourceFace(Image.fromarray(np.ascontiguousarray(pixels)), source.box)


def _placement(source: SourceFace, width: float, mirror: bool) -> tuple[float, tuple[int, int], float, float]:
    """Where `source` scaled so its reference box is `width` wide lands: the scale, the patch's size and
    the box centre inside the scaled (and mirrored) patch."""
    x, y, w, h = source.box
    scale = width / w
    if mirror:
        x = source.patch.width - x - w
    size = (max(1, round(source.patch.width * scale)), max(1, round(source.patch.height * scale)))
    return scale, size, (x + w / 2) * scale, (y + h / 2) * scale


def patch_box(source: SourceFace, width: float, mirror: bool, center: tuple[float, float]) -> Box:
    """The canvas area that `paste_face` (unrotated) covers with the patch: what hides the faces behind."""
    _, size, cx, cy = _placement(source, width, mirror)
    return Box(round(center[0] - cx), round(center[1] - cy), *size)


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
    _, _, w, h = source.box
    scale, size, cx, cy = _placement(source, width, mirror)
    patch = source.patch
    if mirror:
        patch = patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    patch = patch.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
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


# ---- clips of people moving -----------------------------------------------------------------------
@dataclass(frozen=True)
class Walk:
    """One person's path through a clip: where the face's centre is and how wide the face is, at the
    start and at the end of the part of the clip the person is in (`shown`, fractions of its length),
    moving evenly between. Positions and widths are fractions of the frame's width and height."""

    source: SourceFace
    start: tuple[float, float]
    end: tuple[float, float]
    widths: tuple[float, float]
    shown: tuple[float, float] = (0.0, 1.0)
    mirror: bool = False

    def at(self, t: float, size: tuple[int, int]) -> tuple[tuple[float, float], float] | None:
        """The face's centre and width in pixels at `t` (0 to 1 over the clip), or None when not shown."""
        first, last = self.shown
        if not first <= t <= last:
            return None
        u = (t - first) / (last - first) if last > first else 0.0
        x = self.start[0] + u * (self.end[0] - self.start[0])
        y = self.start[1] + u * (self.end[1] - self.start[1])
        width = self.widths[0] + u * (self.widths[1] - self.widths[0])
        return (x * size[0], y * size[1]), width * size[0]


@dataclass(frozen=True)
class PeopleClip:
    """A written clip and where each person's face is in each of its frames."""

    path: Path
    size: tuple[int, int]
    fps: int
    boxes: list[list[Box | None]]  # per frame, per person (as the walks are given): None when not shown
    visible: list[list[bool]]  # per frame, per person: shown, inside the frame, and hardly covered

    @property
    def n_frames(self) -> int:
        return len(self.boxes)


def people_clip(
    path: Path,
    walks: Sequence[Walk],
    *,
    n_frames: int = 48,
    size: tuple[int, int] = (960, 540),
    fps: int = 25,
    seed: int = 0,
) -> PeopleClip:
    """An H.264 clip of people walking over a still noise background, each walk pasted after (so in
    front of) the ones before it. The truth says each face's box and whether it is visible."""
    scene = background(np.random.default_rng(seed), size)
    boxes, visible = [], []
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "18"}
        for i in range(n_frames):
            t = i / max(1, n_frames - 1)
            canvas = scene.copy()
            frame_boxes: list[Box | None] = []
            patches: list[Box | None] = []
            for walk in walks:
                place = walk.at(t, size)
                if place is None:
                    frame_boxes.append(None)
                    patches.append(None)
                    continue
                center, width = place
                frame_boxes.append(paste_face(canvas, walk.source, width, 0.0, walk.mirror, center))
                patches.append(patch_box(walk.source, width, walk.mirror, center))
            boxes.append(frame_boxes)
            visible.append([_visible(j, frame_boxes, patches, size) for j in range(len(walks))])
            frame = av.VideoFrame.from_ndarray(np.asarray(canvas), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return PeopleClip(path, size, fps, boxes, visible)


def _visible(person: int, boxes: list[Box | None], patches: list[Box | None], size: tuple[int, int]) -> bool:
    box = boxes[person]
    if box is None or box.x < 0 or box.y < 0 or box.x + box.w > size[0] or box.y + box.h > size[1]:
        return False
    covered = np.zeros((box.h, box.w), dtype=bool)
    for patch in patches[person + 1 :]:
        if patch is None:
            continue
        left, top = max(patch.x - box.x, 0), max(patch.y - box.y, 0)
        right, bottom = min(patch.x + patch.w - box.x, box.w), min(patch.y + patch.h - box.y, box.h)
        if right > left and bottom > top:
            covered[top:bottom, left:right] = True
    return bool(covered.mean() <= VISIBLE_MAX_COVER)


def three_people_clip(
    path: Path, source: SourceFace, *, size: tuple[int, int] = (1920, 1080), n_frames: int = 75
) -> PeopleClip:
    """Three people in one clip (1080p by default), from one face recoloured, as in a meeting's wide
    shot: one close and nearly still, one walking across behind them, one small (60 px wide at 1920)."""
    walks = [
        Walk(recoloured(source, 1), (0.1, 0.35), (0.9, 0.3), (80 / 1920, 90 / 1920)),
        Walk(recoloured(source, 2), (0.8, 0.7), (0.75, 0.72), (60 / 1920, 60 / 1920)),
        Walk(recoloured(source, 0), (0.45, 0.5), (0.5, 0.48), (160 / 1920, 150 / 1920), mirror=True),
    ]
    return people_clip(path, walks, n_frames=n_frames, size=size)
