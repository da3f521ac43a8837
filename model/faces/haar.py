"""OpenCV's frontal-face Haar cascade, which ships inside the opencv-python 4.x wheel (nothing is
downloaded). Detection runs on a grey copy scaled to at most DETECT_SIDE pixels; boxes are reported in
the original image's coordinates, largest first. It gives no landmarks and no confidence (score 1)."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from model.faces.base import Box, Face

CASCADE = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
# Longest side the detector sees, pyramid step and smallest face (a fraction of the short side): a
# coarser search than OpenCV's defaults, which costs few faces of the sizes FER cares about and saves time.
DETECT_SIDE = 480
SCALE_STEP = 1.15
MIN_FACE_FRACTION = 0.08


class HaarDetector:
    name = "haar"

    def __init__(self) -> None:
        self._local = threading.local()  # a CascadeClassifier is not safe to share between threads

    def _classifier(self) -> cv2.CascadeClassifier:
        classifier = getattr(self._local, "classifier", None)
        if classifier is None:
            classifier = cv2.CascadeClassifier(str(CASCADE))
            if classifier.empty():
                raise RuntimeError(f"could not load the face cascade from {CASCADE}")
            self._local.classifier = classifier
        return classifier

    def detect(self, image: Image.Image, max_faces: int, long_side: int | None = None) -> list[Face]:
        """`long_side` replaces DETECT_SIDE for this call. The smallest face searched for keeps its size in
        searched pixels, so a larger side finds smaller faces."""
        search_side = long_side or DETECT_SIDE
        scale = min(1.0, search_side / max(image.size))
        width, height = (max(1, round(side * scale)) for side in image.size)  # a thin strip keeps 1 px
        small = image if scale == 1.0 else image.resize((width, height))
        grey = cv2.equalizeHist(np.asarray(small.convert("L")))
        min_fraction = MIN_FACE_FRACTION * min(1.0, DETECT_SIDE / search_side)
        min_side = max(20, round(min_fraction * min(grey.shape)))
        found = self._classifier().detectMultiScale(
            grey, scaleFactor=SCALE_STEP, minNeighbors=5, minSize=(min_side, min_side)
        )
        boxes = [
            Box(round(x / scale), round(y / scale), round(w / scale), round(h / scale))
            for (x, y, w, h) in found
        ]
        boxes.sort(key=lambda b: b.area, reverse=True)
        return [Face(box, 1.0) for box in boxes[:max_faces]]
