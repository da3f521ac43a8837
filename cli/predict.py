"""`fer predict`, `fer predict-video`, `fer retrieve`: the service's answers for local files, one JSON
line per input on stdout, through the same pipeline stages and options as the service."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from model.prompts import CLASS_PRESETS, DEFAULT_CLASSES, DEFAULT_PROMPTS, PROMPT_SET_NAMES

if TYPE_CHECKING:
    from model.pipeline import FrameWorkers

FILE_CHUNK = 32  # files decoded, then encoded together
ENCODE_BATCH = 64
MAX_FRAMES = 512


def add_label_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--classes",
        default=DEFAULT_CLASSES,
        help=f"a class preset ({', '.join(CLASS_PRESETS)}) or a comma-separated list of class words",
    )
    parser.add_argument(
        "--prompts", default=DEFAULT_PROMPTS, help=f"prompt set: {', '.join(PROMPT_SET_NAMES)} (default P-3)"
    )
    parser.add_argument(
        "--check-words",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="refuse a class word that looks like a typo of a known one, e.g. hapiness (default: on; "
        "--no-check-words uses the words as written)",
    )


def add_face_option(parser: argparse.ArgumentParser, default: str = "on, as the service") -> None:
    parser.add_argument(
        "--detect-faces",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"classify each detected face (a video: each person's faces, as a track) instead of the whole image "
        f"(default: {default}; FER_FACE_DETECTOR=none turns detection off)",
    )


def add_frames_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=16, help="frames sampled per clip (default 16)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify images (each detected face, as POST /predict)")
    add_label_options(p)
    add_face_option(p)
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.set_defaults(handler=cmd_predict)

    p = sub.add_parser("predict-video", help="classify video clips (sampled frames, pooled features)")
    add_label_options(p)
    add_face_option(p)
    add_frames_option(p)
    p.add_argument("--per-frame", action="store_true", help="add a per-frame timeline")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.set_defaults(handler=cmd_predict_video)

    p = sub.add_parser("retrieve", help="rank text descriptions for a video (or an image)")
    p.add_argument("file", type=Path, metavar="VIDEO")
    p.add_argument("--descriptions", type=Path, required=True, help="a text file, one description per line")
    p.add_argument("--top-k", type=int, default=None, help="how many to print (default: all)")
    add_face_option(p)
    add_frames_option(p)
    p.add_argument(
        "--per-frame",
        action="store_true",
        help="add each sampled frame's score per description (the timeline, and each person's frames)",
    )
    p.set_defaults(handler=cmd_retrieve)


def check_frames(frames: int, settings) -> None:
    if not 1 <= frames <= MAX_FRAMES:
        raise ValueError(f"--frames {frames}: sample between 1 and {MAX_FRAMES} frames")
    if frames > settings.max_decode_frames:  # every clip of that many frames would be refused
        raise ValueError(
            f"--frames {frames} is above FER_MAX_DECODE_FRAMES ({settings.max_decode_frames}): "
            f"sampling {frames} frames decodes at least {frames}"
        )


class Runner:
    """The model, the face detector and the options of one command, built once."""

    def __init__(self, args: argparse.Namespace, settings) -> None:
        from model.engine import create_engine
        from model.faces.factory import create_detector

        self.options = settings.pipeline_options(
            detect_faces=args.detect_faces, frames=getattr(args, "frames", None)
        )
        self.detector = (
            create_detector(settings.face_detector, settings.face_threshold)
            if self.options.detect_faces
            else None
        )
        self.engine = create_engine(settings)

    def prepare(self, prepare: Callable, path: Path):
        from model.pipeline import open_source

        with open_source(path) as source:
            return prepare(source, self.engine.prepare_many, self.detector, self.options)

    def encode(self, prepared: Sequence) -> list:
        import torch

        from model.pipeline import encode_in_batches, split_rows

        pixels = torch.cat([p.pixels for p in prepared])
        return split_rows(encode_in_batches(self.engine.encode_pixels, pixels, ENCODE_BATCH), prepared)


@contextlib.contextmanager
def frame_workers() -> Iterator[FrameWorkers]:
    """Threads that search a clip's sampled frames for faces at once, one per CPU torch sees (the
    service's default decode threads): files are prepared one at a time, so each clip has them all."""
    import torch

    from model.pipeline import FrameWorkers

    threads = torch.get_num_threads()
    with ThreadPoolExecutor(threads, "fer-frames") as pool:
        yield FrameWorkers.sharing(pool, threads)


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _classify_files(args, settings, prepare: Callable, score: Callable) -> int:
    """Each file decoded on its own (an error stays that file's, on stderr), then a chunk of files
    encoded together and answered in input order."""
    from model.media import MediaError
    from model.prompts import check_class_words, resolve_classes, resolve_prompt_set

    classes, prompt_set = resolve_classes(args.classes), resolve_prompt_set(args.prompts)
    if args.check_words:
        check_class_words(classes, "pass --no-check-words to use it as written")
    runner = Runner(args, settings)
    text = runner.engine.class_features(classes, prompt_set)
    failed = 0
    for start in range(0, len(args.files), FILE_CHUNK):
        decoded = []
        for path in args.files[start : start + FILE_CHUNK]:
            try:
                decoded.append((path, runner.prepare(prepare, path)))
            except (MediaError, OSError) as exc:
                failed += 1
                print(f"fer: {path}: {_media_message(exc)}", file=sys.stderr)
        if not decoded:
            continue
        features = runner.encode([p for _, p in decoded])
        for (path, prepared), rows in zip(decoded, features, strict=True):
            result = score(prepared, rows, text, classes, prompt_set, runner.options)
            _emit({"file": str(path), **asdict(result)})
    return 1 if failed else 0


def _media_message(exc: Exception) -> str:
    from model.files import unreadable
    from model.media import WrongMediaKind

    if isinstance(exc, WrongMediaKind):
        return f"{exc}: use `fer {'predict-video' if exc.kind == 'video' else 'predict'}`"
    if isinstance(exc, OSError):
        return unreadable(exc)
    return str(exc)


def cmd_predict(args: argparse.Namespace, settings) -> int:
    from model.pipeline import predict_image, prepare_image

    return _classify_files(args, settings, prepare_image, predict_image)


def cmd_predict_video(args: argparse.Namespace, settings) -> int:
    from model.pipeline import predict_video, prepare_video

    check_frames(args.frames, settings)

    def score(prepared, rows, text, classes, prompt_set, _options):
        return predict_video(prepared, rows, text, classes, prompt_set, args.per_frame)

    with frame_workers() as workers:
        return _classify_files(args, settings, partial(prepare_video, workers=workers), score)


def _read_descriptions(path: Path) -> list[str]:
    from model.files import unreadable

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"--descriptions {path}: {unreadable(exc)}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--descriptions {path}: not UTF-8 text") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def cmd_retrieve(args: argparse.Namespace, settings) -> int:
    from model.media import MediaError, is_video_path
    from model.pipeline import prepare_clip, rank_descriptions

    check_frames(args.frames, settings)
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k {args.top_k}: give 1 or more")
    descriptions = _read_descriptions(args.descriptions)
    if not descriptions:
        raise ValueError(f"{args.descriptions} holds no descriptions")
    runner = Runner(args, settings)
    try:
        with frame_workers() as workers:
            prepare = partial(prepare_clip, still=not is_video_path(args.file), workers=workers)
            prepared = runner.prepare(prepare, args.file)
    except (MediaError, OSError) as exc:
        print(f"fer: {args.file}: {_media_message(exc)}", file=sys.stderr)
        return 1
    (features,) = runner.encode([prepared])
    text = runner.engine.encode_texts(descriptions).cpu()
    result = rank_descriptions(prepared, features, text, descriptions, args.top_k, args.per_frame)
    _emit({"file": str(args.file), **asdict(result)})
    return 0
