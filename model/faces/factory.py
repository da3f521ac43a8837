"""Face detectors by name: what `FER_FACE_DETECTOR` chooses."""

from __future__ import annotations

from typing import Literal

from model.faces.base import FaceDetector

DetectorName = Literal["retinaface", "haar", "none"]
DETECTORS: tuple[str, ...] = ("retinaface", "haar", "none")


def create_detector(name: DetectorName, score_threshold: float = 0.7) -> FaceDetector | None:
    """A detector, loaded once (callers share it between threads); None for `none`."""
    if name == "none":
        return None
    if name == "haar":
        from model.faces.haar import HaarDetector

        return HaarDetector()
    if name == "retinaface":
        from model.faces.retinaface import RetinaFaceDetector

        return RetinaFaceDetector(score_threshold=score_threshold)
    raise ValueError(f"unknown face detector {name!r}: choose one of {', '.join(DETECTORS)}")
