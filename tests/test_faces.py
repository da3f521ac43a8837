"""The RetinaFace detector and face crops: faces pasted at known places on synthetic canvases (the
astronaut photo's face, and real faces from the development data where it is present), landmarks,
alignment, small inputs and concurrent calls."""

from __future__ import annotations

import hashlib
import math
import threading

import numpy as np
import pytest
from PIL import Image
from skimage import data

from model.faces.align import crop_face, eye_angle, landmarks_reliable, plain_crop
from model.faces.base import Box, Face
from model.faces.retinaface import WEIGHTS_SHA256, RetinaFaceDetector, model_bytes
from model.faces.synthetic import ASTRONAUT_FACE, SourceFace, background, iou, match, paste_face
from model.faces.synthetic import astronaut_face as cut_astronaut_face


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(data.astronaut())


@pytest.fixture(scope="module")
def astronaut_face() -> SourceFace:
    """The face with about half its size of context on every side, and its box inside that patch."""
    return cut_astronaut_face()


def canvas_with(
    sources: list[SourceFace], placements: list[tuple[float, float, bool, tuple[float, float]]], seed: int = 0
) -> tuple[Image.Image, list[Box]]:
    """A 640x480 noise canvas with one face per (width, angle, mirrored, centre)."""
    canvas = background(np.random.default_rng(seed), (640, 480))
    boxes = [
        paste_face(canvas, sources[i % len(sources)], width, angle, mirrored, centre)
        for i, (width, angle, mirrored, centre) in enumerate(placements)
    ]
    return canvas, boxes


def rotated_astronaut(astronaut: Image.Image, degrees: float) -> Image.Image:
    """The photo turned counter-clockwise about the face's centre (the eye line then slopes up)."""
    centre = (ASTRONAUT_FACE.x + ASTRONAUT_FACE.w / 2, ASTRONAUT_FACE.y + ASTRONAUT_FACE.h / 2)
    return astronaut.rotate(degrees, resample=Image.Resampling.BICUBIC, center=centre)


def test_the_model_comes_from_the_installed_wheel():
    assert hashlib.sha256(model_bytes()).hexdigest() == WEIGHTS_SHA256
    assert model_bytes() is model_bytes()  # read once


def test_the_astronaut_face_and_its_landmarks(detector, astronaut):
    faces = detector.detect(astronaut, 10)
    assert len(faces) == 1
    face = faces[0]
    assert iou(face.box, ASTRONAUT_FACE) > 0.8
    assert 0.7 <= face.score <= 1.0
    (lex, ley), (rex, rey), (nx, ny), (lmx, lmy), (rmx, rmy) = face.landmarks
    assert lex < nx < rex and lmx < rmx  # named by image side: left eye, right eye, ..., right mouth
    assert max(ley, rey) < ny < min(lmy, rmy)  # eyes above the nose, the mouth below it
    assert landmarks_reliable(face)


def test_finds_every_pasted_face_at_several_sizes_and_angles(detector, astronaut_face):
    placements = [
        (120, 0, False, (110, 130)),
        (90, 22, True, (300, 110)),
        (70, -28, False, (500, 110)),
        (60, 15, True, (110, 360)),
        (48, 0, True, (300, 360)),
        (100, -18, False, (500, 350)),
    ]
    canvas, boxes = canvas_with([astronaut_face], placements, seed=2)
    faces = detector.detect(canvas, 20)
    hit, stray = match(boxes, [face.box for face in faces])
    assert all(hit), [(box, face.box) for box, face in zip(boxes, faces, strict=False)]
    assert stray <= 1
    for face in faces:
        x, y, w, h = face.box.as_list()
        assert face.score >= detector.score_threshold
        assert all(
            x - 0.1 * w <= px <= x + 1.1 * w and y - 0.1 * h <= py <= y + 1.1 * h for px, py in face.landmarks
        )


def test_sixteen_small_faces(detector, astronaut_face):
    rng = np.random.default_rng(3)
    placements = [
        (
            float(rng.uniform(44, 56)),
            float(rng.choice([0, 20, -20])),
            bool(col % 2),
            (80 + 160 * col, 60 + 120 * row),
        )
        for row in range(4)
        for col in range(4)
    ]
    canvas, boxes = canvas_with([astronaut_face], placements, seed=3)
    faces = detector.detect(canvas, 40)
    hit, stray = match(boxes, [face.box for face in faces])
    assert sum(hit) >= 15 and stray <= 1


def test_largest_first_and_max_faces(detector, astronaut_face):
    placements = [(50, 0, False, (120, 240)), (130, 0, False, (320, 240)), (80, 0, False, (520, 240))]
    canvas, _ = canvas_with([astronaut_face], placements)
    faces = detector.detect(canvas, 10)
    assert [face.box.area for face in faces] == sorted((face.box.area for face in faces), reverse=True)
    assert len(faces) == 3
    assert detector.detect(canvas, 2) == faces[:2]
    assert detector.detect(canvas, 0) == []


def test_large_images_are_detected_downscaled_and_mapped_back(detector, astronaut):
    big = astronaut.resize((2048, 2048), Image.Resampling.BICUBIC)
    (face,) = detector.detect(big, 10)
    expected = Box(*(4 * v for v in ASTRONAUT_FACE.as_list()))
    assert iou(face.box, expected) > 0.75
    assert all(expected.x <= x <= expected.x + expected.w for x, _ in face.landmarks)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "RGB"])
def test_image_modes(detector, astronaut, mode):
    (face,) = detector.detect(astronaut.convert(mode), 5)
    assert iou(face.box, ASTRONAUT_FACE) > 0.7


def test_no_face_no_box(detector):
    assert detector.detect(Image.new("RGB", (320, 240), (90, 120, 200)), 5) == []
    assert detector.detect(background(np.random.default_rng(7), (640, 480)), 5) == []
    assert detector.detect(Image.new("L", (1, 1)), 5) == []


def test_a_48x48_face_crop_is_found(detector, astronaut):
    box = ASTRONAUT_FACE
    tight = (
        astronaut.crop((box.x, box.y + 10, box.x + box.w, box.y + box.w + 10)).convert("L").resize((48, 48))
    )
    (face,) = detector.detect(tight, 1)
    assert face.box.w >= 24  # the face, not a speck: it fills most of the crop
    assert face.box.x >= 0 and face.box.x + face.box.w <= 48


def test_ferplus_faces_are_found(detector, shared_data):
    files = sorted((shared_data / "ferplus_valid" / "images").glob("*.png"))[:60]
    found = sum(bool(detector.detect(Image.open(file), 1)) for file in files)
    assert found >= 0.95 * len(files)


def test_real_faces_from_the_mafw_samples(detector, shared_data):
    sources = []
    for clip in sorted((shared_data / "mafw_samples" / "clips").glob("*.gif"))[:6]:
        with Image.open(clip) as gif:
            frame = gif.convert("RGB")  # the first frame
        (face,) = detector.detect(frame, 1)  # each of these clips' first frames has one face
        box = face.box
        left, top = max(0, box.x - box.w // 3), max(0, box.y - box.h // 3)
        patch = frame.crop((left, top, box.x + box.w + box.w // 3, box.y + box.h + box.h // 3))
        sources.append(SourceFace(patch, (box.x - left, box.y - top, box.w, box.h)))
    placements = [
        (width, angle, mirrored, (110 + 210 * (i % 3), 120 + 240 * (i // 3)))
        for i, (width, angle, mirrored) in enumerate(
            [
                (100, 0, False),
                (70, 20, True),
                (50, -25, False),
                (90, -15, True),
                (60, 0, True),
                (110, 25, False),
            ]
        )
    ]
    canvas, boxes = canvas_with(sources, placements, seed=1)
    hit, stray = match(boxes, [face.box for face in detector.detect(canvas, 20)])
    assert sum(hit) >= 5 and stray <= 1


def test_concurrent_calls_give_the_same_boxes(detector, astronaut, astronaut_face):
    images = [
        astronaut,
        rotated_astronaut(astronaut, 20),
        canvas_with([astronaut_face], [(60, 0, False, (200, 200)), (90, 10, True, (450, 250))])[0],
        astronaut.resize((96, 96)),
    ]
    expected = [detector.detect(image, 10) for image in images]
    results: dict[tuple[int, int], list[Face]] = {}
    barrier = threading.Barrier(4)

    def work(worker: int) -> None:
        barrier.wait()
        for round_ in range(2):
            for i, image in enumerate(images):
                results[(worker, round_ * len(images) + i)] = detector.detect(image, 10)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 * 2 * len(images)
    for (_, index), faces in results.items():
        assert faces == expected[index % len(images)]


def test_score_threshold(detector, astronaut_face):
    with pytest.raises(ValueError):
        RetinaFaceDetector(score_threshold=1.5)
    canvas, _ = canvas_with(
        [astronaut_face], [(40, 0, False, (300, 200)), (100, 20, True, (450, 300))], seed=5
    )
    lenient = RetinaFaceDetector(score_threshold=0.05).detect(canvas, 100)
    assert any(face.score < detector.score_threshold for face in lenient)
    assert all(face.score >= 0.05 for face in lenient)
    # A box below the threshold never suppresses a stronger one, so raising it only drops boxes.
    assert detector.detect(canvas, 100) == [
        face for face in lenient if face.score >= detector.score_threshold
    ]


# Alignment and crops


@pytest.mark.parametrize("degrees", [-25, 20])
def test_alignment_levels_the_eye_line(detector, astronaut, degrees):
    (upright,) = detector.detect(astronaut, 1)
    rotated = rotated_astronaut(astronaut, degrees)
    (face,) = detector.detect(rotated, 1)
    # The photo's turn shows in the landmarks (counter-clockwise is negative with y pointing down).
    assert abs(eye_angle(face) - (eye_angle(upright) - degrees)) < 6
    aligned = crop_face(rotated, face, margin=0.25, align=True)
    assert aligned.size == (
        face.box.w + 2 * round(face.box.w * 0.25),
        face.box.h + 2 * round(face.box.h * 0.25),
    )
    (again,) = detector.detect(aligned, 1)
    (unaligned,) = detector.detect(crop_face(rotated, face, align=False), 1)
    assert abs(eye_angle(unaligned)) > 10
    # Within a few degrees: what is left is the landmarks' own error on a turned face.
    assert abs(eye_angle(again)) < min(6, abs(eye_angle(unaligned)) / 3)


def test_aligned_crop_of_a_level_face_is_the_plain_crop(astronaut):
    box = ASTRONAUT_FACE
    level = Face(box, 0.99, ((200.0, 100.0), (250.0, 100.0), (225.0, 125.0), (205.0, 145.0), (245.0, 145.0)))
    assert landmarks_reliable(level)
    aligned, plain = crop_face(astronaut, level), plain_crop(astronaut, level)
    assert aligned.size == plain.size
    assert np.array_equal(np.asarray(aligned), np.asarray(plain))


def test_plain_crop_is_the_grown_box_clipped_to_the_image(astronaut):
    face = Face(Box(10, 20, 100, 80), 0.9, None)
    crop = crop_face(astronaut, face, margin=0.25)  # no landmarks: plain whatever `align` says
    assert crop.size == (10 + 100 + 25, 20 + 80 + 20)
    assert crop_face(astronaut, face, margin=0.0, align=False).size == (100, 80)


@pytest.mark.parametrize(
    "landmarks",
    [
        None,
        (
            (240.0, 100.0),
            (244.0, 101.0),
            (250.0, 125.0),
            (238.0, 145.0),
            (246.0, 146.0),
        ),  # profile: eyes together
        ((200.0, 100.0), (250.0, 100.0), (225.0, 125.0), (205.0, 400.0), (245.0, 400.0)),  # mouth far outside
        ((200.0, 145.0), (250.0, 145.0), (225.0, 125.0), (205.0, 100.0), (245.0, 100.0)),  # upside down
        (
            (225.0, 80.0),
            (230.0, 150.0),
            (210.0, 115.0),
            (260.0, 90.0),
            (262.0, 140.0),
        ),  # eye line steeper than 60°
        ((200.0, float("nan")), (250.0, 100.0), (225.0, 125.0), (205.0, 145.0), (245.0, 145.0)),
    ],
)
def test_unreliable_landmarks_give_the_plain_crop(astronaut, landmarks):
    face = Face(ASTRONAUT_FACE, 0.9, landmarks)
    assert not landmarks_reliable(face)
    assert np.array_equal(np.asarray(crop_face(astronaut, face)), np.asarray(plain_crop(astronaut, face)))


def test_aligned_crop_keeps_grey_and_converts_other_modes(astronaut):
    face = Face(
        ASTRONAUT_FACE, 0.9, ((200.0, 110.0), (250.0, 95.0), (228.0, 125.0), (210.0, 150.0), (250.0, 138.0))
    )
    assert crop_face(astronaut.convert("L"), face).mode == "L"
    assert crop_face(astronaut.convert("RGBA"), face).mode == "RGB"
    angle = math.degrees(math.atan2(95 - 110, 250 - 200))
    assert eye_angle(face) == pytest.approx(angle)


def test_canvas_helpers():
    assert iou(Box(0, 0, 10, 10), Box(5, 0, 10, 10)) == pytest.approx(50 / 150)
    hit, stray = match([Box(0, 0, 10, 10), Box(100, 100, 10, 10)], [Box(1, 1, 10, 10), Box(50, 50, 5, 5)])
    assert hit == [True, False] and stray == 1


def test_a_video_frame_is_searched_at_the_video_side(detector, astronaut):
    from model.options import PipelineOptions
    from model.pipeline import faces_in_frame

    big = astronaut.resize((2048, 2048))  # 4x: the frame is searched at 320 px, 0.156 of its size
    searched = []

    class Spy:
        def detect(self, image, max_faces, long_side=None):
            searched.append(long_side)
            return detector.detect(image, max_faces, long_side=long_side)

    (face,) = faces_in_frame(big, Spy(), PipelineOptions(video_face_side=320))
    assert searched == [320]
    assert iou(face.box, Box(*(4 * v for v in ASTRONAUT_FACE.as_list()))) >= 0.5
    assert all(face.box.x <= x <= face.box.x + face.box.w for x, _ in face.landmarks)
    scaled = Face(Box(10, 20, 30, 40), 0.9, ((1.0, 2.0),) * 5).scaled(2.0)
    assert scaled.box == Box(20, 40, 60, 80) and scaled.landmarks[0] == (2.0, 4.0) and scaled.score == 0.9
