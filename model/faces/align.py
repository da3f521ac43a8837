"""Face crops: the detector's box grown by a margin, optionally rotated so the eye line is level.

An aligned crop has the size of the box grown by `margin` on every side and the box's centre; it is
sampled along axes turned by the eye line's angle. That is the same as rotating the image about the eye
midpoint until the eyes are level and cropping the rotated box there, without rotating the whole image.
Its scale follows the box, not the eye distance, because the eyes draw together when a head turns
while the box keeps the face's size. Parts of the crop outside the image repeat the nearest edge pixel.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image

from model.faces.base import Face

# Eye distance below this fraction of the box width: a profile or a bad fit, whose eye line says little.
MIN_EYE_DISTANCE = 0.25
# Landmarks may lie this fraction of the box's size outside it before they count as a bad fit.
BOX_TOLERANCE = 0.1
# The mouth must lie at least this many eye distances below the eye line (a face's up is up).
MIN_MOUTH_DROP = 0.5
MAX_ROLL_DEGREES = 60.0  # a steeper eye line is more likely a wrong fit than a head lying on its side


def eye_angle(face: Face) -> float:
    """The eye line's angle in degrees, clockwise in image coordinates (y down); 0 when level."""
    if face.landmarks is None:
        raise ValueError("the face has no landmarks")
    (lx, ly), (rx, ry) = face.landmarks[0], face.landmarks[1]
    return math.degrees(math.atan2(ry - ly, rx - lx))


def landmarks_reliable(face: Face) -> bool:
    """True when the five landmarks look like a frontal-to-three-quarter face: the eyes apart and level
    within MAX_ROLL_DEGREES, the mouth below them, every point in or near the box."""
    if face.landmarks is None or len(face.landmarks) != 5:
        return False
    points = np.asarray(face.landmarks, dtype=np.float64)
    if not np.isfinite(points).all():
        return False
    box = face.box
    dx, dy = box.w * BOX_TOLERANCE, box.h * BOX_TOLERANCE
    inside = (
        (points[:, 0] >= box.x - dx)
        & (points[:, 0] <= box.x + box.w + dx)
        & (points[:, 1] >= box.y - dy)
        & (points[:, 1] <= box.y + box.h + dy)
    )
    if not inside.all():
        return False
    left_eye, right_eye, _, left_mouth, right_mouth = points
    eyes = right_eye - left_eye
    distance = float(np.hypot(*eyes))
    if distance < MIN_EYE_DISTANCE * box.w:
        return False
    if abs(math.degrees(math.atan2(eyes[1], eyes[0]))) > MAX_ROLL_DEGREES:
        return False
    down = np.array([-eyes[1], eyes[0]]) / distance  # the eye line turned a quarter clockwise
    drop = float(((left_mouth + right_mouth) / 2 - (left_eye + right_eye) / 2) @ down)
    return drop >= MIN_MOUTH_DROP * distance


def plain_crop(image: Image.Image, face: Face, margin: float = 0.25) -> Image.Image:
    """The box grown by `margin` of its size on every side, clipped to the image."""
    box = face.box
    dx, dy = round(box.w * margin), round(box.h * margin)
    left, top = max(0, box.x - dx), max(0, box.y - dy)
    right, bottom = min(image.width, box.x + box.w + dx), min(image.height, box.y + box.h + dy)
    return image.crop((left, top, right, bottom))


def crop_face(image: Image.Image, face: Face, margin: float = 0.25, align: bool = True) -> Image.Image:
    """The face's crop: aligned (eye line level) when `align` and its landmarks are reliable, else the
    plain box grown by `margin` and clipped to the image. An aligned crop keeps RGB or L images' mode;
    other modes come back as RGB."""
    if not align or not landmarks_reliable(face):
        return plain_crop(image, face, margin)
    box = face.box
    width = max(1, box.w + 2 * round(box.w * margin))  # the plain crop's size when nothing is clipped
    height = max(1, box.h + 2 * round(box.h * margin))
    angle = math.radians(eye_angle(face))
    cos, sin = math.cos(angle), math.sin(angle)
    # Pixel centres: the box's centre is at x + w/2 - 0.5, the output's at ((width - 1)/2, (height - 1)/2);
    # output pixel p samples the source at centre + R(angle) @ (p - output centre).
    center_x, center_y = box.x + box.w / 2 - 0.5, box.y + box.h / 2 - 0.5
    half_w, half_h = (width - 1) / 2, (height - 1) / 2
    matrix = np.array(
        [
            [cos, -sin, center_x - cos * half_w + sin * half_h],
            [sin, cos, center_y - sin * half_w - cos * half_h],
        ],
        dtype=np.float64,
    )
    source = image if image.mode in ("RGB", "L") else image.convert("RGB")
    pixels = cv2.warpAffine(
        np.asarray(source),
        matrix,
        (width, height),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return Image.fromarray(pixels)
