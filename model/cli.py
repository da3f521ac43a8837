"""`fer`: one entry point, one subcommand per job. Prints one JSON object per input on stdout.

Other packages add their subcommands through `add_commands(subparsers)` in the modules listed in
COMMAND_MODULES; those modules import heavy libraries inside their handlers, so `fer --help` stays quick.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from model.prompts import CLASS_PRESETS, DEFAULT_CLASSES, DEFAULT_PROMPTS, PROMPT_SETS

log = logging.getLogger("fer")

COMMAND_MODULES: tuple[str, ...] = ("service.cli", "model.evaluate.cli", "model.train.cli", "model.weights")
FILE_CHUNK = 32  # files decoded and encoded together


def add_label_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--classes",
        default=DEFAULT_CLASSES,
        help=f"a class preset ({', '.join(CLASS_PRESETS)}) or a comma-separated list of class words",
    )
    parser.add_argument("--prompts", default=DEFAULT_PROMPTS, help=f"prompt set: {', '.join(PROMPT_SETS)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fer", description="Zero-shot facial-expression recognition (Exp-CLIP)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("predict", help="classify images")
    add_label_options(p)
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.set_defaults(handler=cmd_predict)

    p = sub.add_parser("predict-video", help="classify video clips (sampled frames, pooled features)")
    add_label_options(p)
    p.add_argument("--frames", type=int, default=16, help="frames sampled per clip (default 16)")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.set_defaults(handler=cmd_predict_video)

    p = sub.add_parser("retrieve", help="rank text descriptions for a video (or an image)")
    p.add_argument("file", type=Path, metavar="VIDEO")
    p.add_argument("--descriptions", type=Path, required=True, help="a text file, one description per line")
    p.add_argument("--top-k", type=int, default=None, help="how many to print (default: all)")
    p.add_argument("--frames", type=int, default=16)
    p.set_defaults(handler=cmd_retrieve)

    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Configuration errors (unknown preset, missing weights, bad class list): one line, no traceback.
        print(f"fer: error: {exc}", file=sys.stderr)
        return 2


def _engine():
    from model.engine import FerEngine

    return FerEngine.from_settings()


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _classify_files(
    args: argparse.Namespace,
    decode: Callable[[Path], object],
    encode: Callable[[object, list], object],
) -> int:
    """Shared loop of predict / predict-video: decode each file (errors stay per file), encode the
    chunk in one batch, print one JSON line per file in input order."""
    from model.media import MediaError
    from model.prompts import resolve_classes, resolve_prompt_set

    classes, prompts = resolve_classes(args.classes), resolve_prompt_set(args.prompts)
    engine = _engine()
    failed = 0
    for chunk in _chunks(args.files, FILE_CHUNK):
        decoded = []
        for path in chunk:
            try:
                decoded.append((path, decode(path)))
            except (MediaError, OSError) as exc:
                failed += 1
                print(f"fer: {path}: {exc}", file=sys.stderr)
        if not decoded:
            continue
        scores = engine.classify(encode(engine, [item for _, item in decoded]), classes, prompts)
        for row, (path, _) in enumerate(decoded):
            _emit({"file": str(path), "label": scores.label(row), "probabilities": scores.as_dict(row)})
    return 1 if failed else 0


def cmd_predict(args: argparse.Namespace) -> int:
    from model.media import decode_image, existing_file

    return _classify_files(
        args, lambda p: decode_image(existing_file(p)), lambda e, images: e.encode_images(images)
    )


def cmd_predict_video(args: argparse.Namespace) -> int:
    from model.media import existing_file, read_video

    if args.frames < 1:
        raise ValueError("--frames must be at least 1")
    return _classify_files(
        args,
        lambda p: read_video(existing_file(p), args.frames).frames,
        lambda e, clips: e.encode_clips(clips),
    )


def cmd_retrieve(args: argparse.Namespace) -> int:
    from model.media import MediaError, read_frames

    descriptions = [line.strip() for line in args.descriptions.read_text().splitlines() if line.strip()]
    if not descriptions:
        raise ValueError(f"{args.descriptions} holds no descriptions")
    engine = _engine()
    try:
        frames = read_frames(args.file, args.frames)
    except (MediaError, OSError) as exc:
        print(f"fer: {args.file}: {exc}", file=sys.stderr)
        return 1
    ranking = engine.rank(engine.encode_clips([frames])[0], descriptions)[: args.top_k]
    _emit(
        {
            "file": str(args.file),
            "ranking": [{"index": i, "text": descriptions[i], "score": score} for i, score in ranking],
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
