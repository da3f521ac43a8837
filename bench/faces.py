"""`python -m bench.faces --data DIR [--seed N] [--out FILE.json]`: the face detector's benchmark.

One run measures, on a folder of development data (`--data`: MAFW sample clips in mafw_samples/, FER+
validation faces in ferplus_valid/; a figure whose part is missing is None):
- recall on synthetic canvases: faces cut from the MAFW sample frames (around the largest face the
  detector finds in the untouched frame, the reference box) and pasted onto a smooth noise background,
  1, 4 or 16 to a canvas, 70-120 px or about 40 px wide, half of them rotated by 15-30 degrees and half
  mirrored; a face counts as found when a detection has IoU >= 0.3 with its box, and detections that
  match no face are stray boxes;
- the share of MAFW frames (every frame of every clip) with a face found, for the detector and Haar;
- the share of FER+ validation faces (48x48) found, with and without the small-input handling;
- median milliseconds per 640x480 image for the detector and for Haar, each on one thread;
- what an aligned crop costs per face over a plain one, and how level the eye line is after alignment
  on frames turned by 20 degrees (the detector measures it again on the crop).

Prints the JSON report on stdout (and to --out); `python -m bench.run` takes the same measurements and
judges them against its targets (bench.report).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageSequence

from model.faces.align import crop_face, eye_angle, landmarks_reliable
from model.faces.base import Box, Face, FaceDetector
from model.faces.haar import HaarDetector
from model.faces.retinaface import RetinaFaceDetector
from model.faces.synthetic import SourceFace, background, match, paste_face
from model.files import write_text_atomic

log = logging.getLogger(__name__)

IMAGE_SIZE = (640, 480)
REFERENCE_SCORE = 0.9  # reference boxes come from confident detections only
MIN_REFERENCE_WIDTH = 60  # smaller reference faces would be blown up, not shrunk, onto the canvases
PATCH_MARGIN = 0.3  # context cut around a reference box, as a fraction of its size on every side
ROTATION_DEGREES = (15.0, 30.0)
# (faces per canvas, grid columns and rows, face width range in px, canvases, canvas size)
CANVASES: tuple[tuple[int, int, tuple[int, int], int, tuple[int, int]], ...] = (
    (1, 1, (70, 120), 120, (640, 480)),
    (1, 1, (36, 44), 120, (640, 480)),
    (4, 2, (70, 120), 40, (640, 480)),
    (4, 2, (36, 44), 40, (640, 480)),
    (16, 4, (36, 44), 10, (640, 480)),
    # 16 large faces need a larger canvas; the detector sees it scaled to its detection size.
    (16, 4, (70, 120), 10, (1024, 1024)),
)
TIMING_IMAGES = 60
ALIGN_CHECK_DEGREES = 20.0


@dataclass(frozen=True)
class Clip:
    name: str
    frames: list[Image.Image]


def read_clips(root: Path) -> list[Clip]:
    """Every frame of every MAFW sample clip listed in labels.csv, as RGB images."""
    clips = []
    with open(root / "labels.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            with Image.open(root / row["file"]) as gif:
                frames = [frame.convert("RGB") for frame in ImageSequence.Iterator(gif)]
            clips.append(Clip(row["file"], frames))
    return clips


def reference_faces(clips: list[Clip], detector: FaceDetector) -> list[SourceFace]:
    """Each frame's largest confident face, cut out with PATCH_MARGIN of context."""
    sources = []
    for clip in clips:
        for frame in clip.frames:
            faces = [face for face in detector.detect(frame, 5) if face.score >= REFERENCE_SCORE]
            if not faces or faces[0].box.w < MIN_REFERENCE_WIDTH:
                continue
            box = faces[0].box
            dx, dy = box.w * PATCH_MARGIN, box.h * PATCH_MARGIN
            left, top = max(0, round(box.x - dx)), max(0, round(box.y - dy))
            right = min(frame.width, round(box.x + box.w + dx))
            bottom = min(frame.height, round(box.y + box.h + dy))
            patch = frame.crop((left, top, right, bottom))
            sources.append(SourceFace(patch, (box.x - left, box.y - top, box.w, box.h)))
    return sources


def make_canvas(
    rng: np.random.Generator,
    sources: list[SourceFace],
    grid: int,
    widths: tuple[int, int],
    size: tuple[int, int],
) -> tuple[Image.Image, list[tuple[Box, bool, bool]]]:
    """A canvas with grid x grid faces, one per cell at a jittered centre; each truth is (box, rotated,
    mirrored)."""
    canvas = background(rng, size)
    cell_w, cell_h = size[0] / grid, size[1] / grid
    truths = []
    for row in range(grid):
        for col in range(grid):
            source = sources[rng.integers(len(sources))]
            width = float(rng.uniform(*widths))
            rotated, mirrored = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
            angle = float(rng.uniform(*ROTATION_DEGREES) * rng.choice([-1, 1])) if rotated else 0.0
            # Keep the face inside its cell: the jitter is what the face leaves free.
            room_x = max(0.0, (cell_w - width * 1.4) / 2)
            room_y = max(0.0, (cell_h - width * 1.7) / 2)
            center = (
                (col + 0.5) * cell_w + rng.uniform(-room_x, room_x),
                (row + 0.5) * cell_h + rng.uniform(-room_y, room_y),
            )
            box = paste_face(canvas, source, width, angle, mirrored, center)
            truths.append((box, rotated, mirrored))
    return canvas, truths


def canvas_recall(detector: FaceDetector, sources: list[SourceFace], seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    configs = []
    totals = {"faces": 0, "found": 0, "rotated": 0, "rotated_found": 0, "mirrored": 0, "mirrored_found": 0}
    stray_total = canvases_total = 0
    for per_canvas, grid, widths, count, size in CANVASES:
        faces = found = strays = 0
        for _ in range(count):
            canvas, truths = make_canvas(rng, sources, grid, widths, size)
            detections = detector.detect(canvas, 2 * per_canvas + 10)
            hit, stray = match([box for box, _, _ in truths], [face.box for face in detections])
            faces += len(truths)
            found += sum(hit)
            strays += stray
            for (_, rotated, mirrored), ok in zip(truths, hit, strict=True):
                totals["rotated"] += rotated
                totals["rotated_found"] += rotated and ok
                totals["mirrored"] += mirrored
                totals["mirrored_found"] += mirrored and ok
        totals["faces"] += faces
        totals["found"] += found
        stray_total += strays
        canvases_total += count
        configs.append(
            {
                "faces_per_canvas": per_canvas,
                "face_width_px": list(widths),
                "canvas": list(size),
                "canvases": count,
                "faces": faces,
                "found": found,
                "recall": round(found / faces, 4),
                "stray_boxes": strays,
            }
        )
    return {
        "faces": totals["faces"],
        "found": totals["found"],
        "recall": round(totals["found"] / totals["faces"], 4),
        "recall_rotated": round(totals["rotated_found"] / max(1, totals["rotated"]), 4),
        "recall_mirrored": round(totals["mirrored_found"] / max(1, totals["mirrored"]), 4),
        "stray_boxes": stray_total,
        "stray_boxes_per_canvas": round(stray_total / canvases_total, 3),
        "by_layout": configs,
    }


def frames_with_face(detector: FaceDetector, clips: list[Clip]) -> dict[str, Any]:
    frames = [frame for clip in clips for frame in clip.frames]
    found = sum(bool(detector.detect(frame, 1)) for frame in frames)
    return {"frames": len(frames), "with_face": found, "share": round(found / len(frames), 4)}


def ferplus_found(detectors: dict[str, FaceDetector], root: Path) -> dict[str, Any]:
    files = sorted((root / "images").glob("*.png"))
    counts = dict.fromkeys(detectors, 0)
    for file in files:
        with Image.open(file) as image:
            face = image.convert("RGB")
        for name, detector in detectors.items():
            counts[name] += bool(detector.detect(face, 1))
    return {"images": len(files)} | {name: round(count / len(files), 4) for name, count in counts.items()}


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)  # Haar's detectMultiScale would otherwise spread over every core
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


def _median_ms(times: list[float]) -> float:
    return round(statistics.median(times) * 1000, 2)


def timing(detectors: dict[str, FaceDetector], clips: list[Clip]) -> dict[str, Any]:
    """Median ms per 640x480 image (MAFW frames resized), the detectors interleaved image by image so a
    slow spell of a shared machine falls on all of them."""
    frames = [frame for clip in clips for frame in clip.frames]
    step = max(1, len(frames) // TIMING_IMAGES)
    images = [frame.resize(IMAGE_SIZE) for frame in frames[::step][:TIMING_IMAGES]]
    times: dict[str, list[float]] = {name: [] for name in detectors}
    with _one_thread():
        for detector in detectors.values():
            detector.detect(images[0], 10)  # warm-up: lazily built sessions and caches
        for image in images:
            for name, detector in detectors.items():
                start = time.perf_counter()
                detector.detect(image, 10)
                times[name].append(time.perf_counter() - start)
    return {"images": len(images), "size": list(IMAGE_SIZE)} | {
        f"{name}_ms": _median_ms(values) for name, values in times.items()
    }


def alignment_cost(detector: FaceDetector, clips: list[Clip]) -> dict[str, Any]:
    """Median ms of an aligned crop and of a plain one (both turned into pixels) per face, and how level
    the eyes are after alignment: each face's frame is turned by ALIGN_CHECK_DEGREES about the face, and
    the eye line is measured again by the detector on the aligned and on the plain crop."""
    faces = [
        (frame, face) for clip in clips for frame in clip.frames[::4] for face in detector.detect(frame, 1)
    ]

    def measure(crop: Callable[[Image.Image, Face], Image.Image]) -> list[float]:
        times = []
        for frame, face in faces:
            start = time.perf_counter()
            np.asarray(crop(frame, face))
            times.append(time.perf_counter() - start)
        return times

    aligned = measure(lambda image, face: crop_face(image, face, align=True))
    plain = measure(lambda image, face: crop_face(image, face, align=False))
    reliable = [(frame, face) for frame, face in faces if landmarks_reliable(face)]
    residual: dict[bool, list[float]] = {True: [], False: []}
    for i, (frame, face) in enumerate(reliable):
        centre = (face.box.x + face.box.w / 2, face.box.y + face.box.h / 2)
        degrees = ALIGN_CHECK_DEGREES * (1 if i % 2 else -1)
        turned = frame.rotate(degrees, resample=Image.Resampling.BICUBIC, center=centre)
        found = detector.detect(turned, 1)
        if not found or not landmarks_reliable(found[0]):
            continue
        for align in (True, False):
            again = detector.detect(crop_face(turned, found[0], align=align), 1)
            if again and again[0].landmarks is not None:
                residual[align].append(abs(eye_angle(again[0])))
    return {
        "faces": len(faces),
        "landmarks_reliable": len(reliable),
        "aligned_ms": _median_ms(aligned),
        "plain_ms": _median_ms(plain),
        "turned_degrees": ALIGN_CHECK_DEGREES,
        "eye_line_degrees_aligned": _spread(residual[True]),
        "eye_line_degrees_plain": _spread(residual[False]),
    }


def _spread(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"faces": 0}
    return {
        "faces": len(values),
        "median": round(statistics.median(values), 2),
        "p90": round(float(np.percentile(values, 90)), 2),
    }


def measure_faces(data: Path, seed: int = 0) -> dict[str, Any]:
    """Every figure from one run; the data-dependent ones are None where `data` lacks their part."""
    detector = RetinaFaceDetector()
    haar: FaceDetector | None = None
    report: dict[str, Any] = {
        "detector": detector.name,
        "score_threshold": detector.score_threshold,
        "seed": seed,
        "canvases": None,
        "mafw_frames": None,
        "ferplus": None,
        "timing": None,
        "alignment": None,
    }
    mafw = data / "mafw_samples"
    if (mafw / "labels.csv").is_file():
        haar = HaarDetector()
        clips = read_clips(mafw)
        sources = reference_faces(clips, detector)
        log.info("%d clips, %d reference faces", len(clips), len(sources))
        report["canvases"] = {
            "reference_faces": len(sources),
            detector.name: canvas_recall(detector, sources, seed),
            "haar": canvas_recall(haar, sources, seed),
        }
        report["mafw_frames"] = {
            detector.name: frames_with_face(detector, clips),
            "haar": frames_with_face(haar, clips),
        }
        report["timing"] = timing({detector.name: detector, "haar": haar}, clips)
        report["alignment"] = alignment_cost(detector, clips)
    else:
        log.warning("no MAFW samples under %s: canvas, frame and timing figures skipped", data)
    ferplus = data / "ferplus_valid"
    if (ferplus / "images").is_dir():
        haar = haar or HaarDetector()
        report["ferplus"] = ferplus_found(
            {
                "found": detector,
                "found_without_small_input_handling": RetinaFaceDetector(small_side=0),
                "haar_found": haar,
            },
            ferplus,
        )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faces", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="the development data: mafw_samples/ (clips, labels.csv) and ferplus_valid/ (images/)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        parser.error(f"--data {args.data}: no such folder")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = measure_faces(args.data, args.seed)
    text = json.dumps(report, indent=2)
    sys.stdout.write(text + "\n")
    if args.out:  # whole or not at all: a stop mid-write leaves the last whole report
        write_text_atomic(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
