"""Face detection with OpenCV's frontal-face Haar cascade, which ships inside the opencv-python 4.x wheel
(nothing is downloaded). Detection runs on a grey copy scaled to at most DETECT_SIDE pixels; boxes are
reported in the original image's coordinates, largest first, and crops take a margin around the box."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

CASCADE = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
# Longest side the detector sees, pyramid step and smallest face (fraction of the short side). Against
# (640, 1.1, 0.06), on the two-face test image and 60 frames of the MAFW sample clips in ../shared/data
# (2026-11-24, one core, a one-off timing script not kept in the repo): 21 vs 41 ms an image, both faces
# of the test image, a face in 51 vs 53 of the 60 frames.
DETECT_SIDE = 480
SCALE_STEP = 1.15
MIN_FACE_FRACTION = 0.08
_local = threading.local()  # CascadeClassifier is not safe to share between threads


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    w: int
    h: int

    @property
    def area(self) -> int:
        return self.w * self.h

    def as_list(self) -> list[int]:
        return [self.x, self.y, self.w, self.h]


def _classifier() -> cv2.CascadeClassifier:
    classifier = getattr(_local, "classifier", None)
    if classifier is None:
        classifier = cv2.CascadeClassifier(str(CASCADE))
        if classifier.empty():
            raise RuntimeError(f"could not load the face cascade from {CASCADE}")
        _local.classifier = classifier
    return classifier


def detect_faces(image: Image.Image, max_faces: int = 10) -> list[Box]:
    """Boxes [x, y, w, h] in `image` coordinates, largest first."""
    scale = min(1.0, DETECT_SIDE / max(image.size))
    width, height = (max(1, round(side * scale)) for side in image.size)  # a thin strip keeps 1 px
    small = image if scale == 1.0 else image.resize((width, height))
    grey = cv2.equalizeHist(np.asarray(small.convert("L")))
    min_side = max(20, round(MIN_FACE_FRACTION * min(grey.shape)))
    found = _classifier().detectMultiScale(
        grey, scaleFactor=SCALE_STEP, minNeighbors=5, minSize=(min_side, min_side)
    )
    boxes = [
        Box(round(x / scale), round(y / scale), round(w / scale), round(h / scale)) for (x, y, w, h) in found
    ]
    boxes.sort(key=lambda b: b.area, reverse=True)
    return boxes[:max_faces]


def crop_face(image: Image.Image, box: Box, margin: float = 0.25) -> Image.Image:
    """The box grown by `margin` of its size on every side, clipped to the image."""
    dx, dy = round(box.w * margin), round(box.h * margin)
    left, top = max(0, box.x - dx), max(0, box.y - dy)
    right, bottom = min(image.width, box.x + box.w + dx), min(image.height, box.y + box.h + dy)
    return image.crop((left, top, right, bottom))
