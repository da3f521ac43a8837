"""Types shared by the face detectors: a box, a detected face with its five landmarks, and the detector
protocol the service calls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from PIL import Image

Point = tuple[float, float]


@dataclass(frozen=True)
class Box:
    """[x, y, w, h] in the original image's pixels."""

    x: int
    y: int
    w: int
    h: int

    @property
    def area(self) -> int:
        return self.w * self.h

    def as_list(self) -> list[int]:
        return [self.x, self.y, self.w, self.h]


@dataclass(frozen=True)
class Face:
    """One detection. `landmarks` are five points in original image pixels, named by where they lie in
    the image (not on the person): eye on the image's left, eye on the image's right, nose tip, mouth
    corner on the image's left, mouth corner on the image's right. None for detectors without them."""

    box: Box
    score: float  # detector confidence in [0, 1]
    landmarks: tuple[Point, ...] | None = None

    def scaled(self, fx: float, fy: float | None = None) -> Face:
        """The same face in an image `fx` times as wide and `fy` times as tall (default: `fx`); boxes
        and landmarks map back."""
        fy = fx if fy is None else fy
        box = self.box
        landmarks = None if self.landmarks is None else tuple((px * fx, py * fy) for px, py in self.landmarks)
        return Face(
            Box(round(box.x * fx), round(box.y * fy), round(box.w * fx), round(box.h * fy)),
            self.score,
            landmarks,
        )


class FaceDetector(Protocol):
    """Finds faces in a PIL image. Implementations are safe to call from several threads at once."""

    name: str

    def detect(self, image: Image.Image, max_faces: int, long_side: int | None = None) -> list[Face]:
        """At most `max_faces` faces, largest box first, in the image's pixels. `long_side`: the long side
        a larger image is searched at (None: the detector's own, tuned for photos)."""
        ...
