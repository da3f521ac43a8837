"""`fer eval` and `fer eval-retrieval`: the paper's tables on a user's labelled data (model.evaluate)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cli.cluster import add_ray_options, ray_options
from cli.predict import add_face_option, add_frames_option
from model.prompts import CLASS_PRESETS, PROMPT_SETS

# Evaluation sets are usually face crops already (RAF-DB, FERPlus, AffectNet): detecting again would
# crop a crop, and the paper's numbers were computed on the crops as given.
EVAL_FACES = (
    "off: datasets hold face crops, scored as given, as in the paper; on: each image's largest face, each "
    "clip's main track (the person in the most frames)"
)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="UAR/WAR per model and prompt set, confusion matrices, feature variance on labelled data"
    )
    p.add_argument(
        "--data", type=Path, required=True, help="a folder with one sub-folder per class, or a CSV file,label"
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--classes",
        default=None,
        help=f"a class preset ({', '.join(CLASS_PRESETS)}) or comma-separated class words "
        "(default: the smallest of basic7/basic8/all11 holding every label)",
    )
    p.add_argument(
        "--prompts", default=",".join(PROMPT_SETS), help="comma-separated prompt sets (default: all five)"
    )
    _add_common(p)
    p.set_defaults(handler=cmd_eval)

    p = subparsers.add_parser(
        "eval-retrieval", help="Precision@k, Recall@k and MRR of item-to-description retrieval"
    )
    p.add_argument("--data", type=Path, required=True, help="a CSV file,description (an item may repeat)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--k", default="1,5,10", help="comma-separated cut-offs (default 1,5,10)")
    _add_common(p)
    p.set_defaults(handler=cmd_eval_retrieval)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--models",
        default=None,
        help="comma-separated presets or projection files (with the FER_* CLIP), or `none` "
        "(the FER_* CLIP without W); default: the FER_* configured model",
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate a seeded random subset of N items")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="items per encoder batch (default 64)")
    add_frames_option(p)
    add_face_option(p, EVAL_FACES)
    add_ray_options(p, gpus_default="1")


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _common(args: argparse.Namespace, settings) -> dict:
    """What both evaluations take from the command line, checked before a cluster is started (a typo in
    --models or --frames is one line, not a Ray start-up first)."""
    from cli.predict import check_frames
    from model.cluster import import_ray
    from model.evaluate.models import model_choices
    from model.faces.factory import create_detector

    check_frames(args.frames, settings)
    on_ray = ray_options(args) is not None
    if on_ray:
        import_ray()  # a missing extra is the first error, before weights or data are checked
    options = settings.pipeline_options(detect_faces=bool(args.detect_faces), frames=args.frames)
    # Under --ray the decode actors make their own detector.
    local_detector = options.detect_faces and not on_ray
    return {
        "models": model_choices(args.models, settings),
        "limit": args.limit,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "options": options,
        "detector": create_detector(settings.face_detector, settings.face_threshold)
        if local_detector
        else None,
    }


def cmd_eval(args: argparse.Namespace, settings) -> int:
    from model.evaluate.run import run_eval
    from model.prompts import resolve_prompt_sets

    prompt_sets = resolve_prompt_sets(_split(args.prompts))  # a typo is one line, before any work
    common = _common(args, settings)
    with _backend(args) as backend:
        metrics = run_eval(
            args.data,
            args.out,
            classes=args.classes,
            prompt_sets=prompt_sets,
            backend=backend,
            **common,
        )
    print((args.out / "table.md").read_text(), end="")
    skipped = {f for m in metrics["models"].values() for f in m["skipped"]}
    if skipped:
        print(f"{len(skipped)} unreadable files were skipped (listed in metrics.json)")
    print(
        f"wrote {args.out}/: metrics.json, predictions.csv, prompts.json, table.md, confusion_*.png, "
        "feature_variance.png"
    )
    return 0


@contextmanager
def _backend(args: argparse.Namespace) -> Iterator:
    """Where the encoders run: None (this process), or a Ray cluster's, connected for the command."""
    options = ray_options(args)
    if options is None:
        yield None
        return
    from model.cluster import ray_session
    from model.evaluate.distributed import RayEvalBackend

    with ray_session(options):
        yield RayEvalBackend(options)


def cmd_eval_retrieval(args: argparse.Namespace, settings) -> int:
    from model.evaluate.retrieval import run_retrieval

    try:
        ks = [int(k) for k in _split(args.k)]
    except ValueError:
        raise ValueError(f"--k takes comma-separated integers, got {args.k!r}") from None
    common = _common(args, settings)
    with _backend(args) as backend:
        metrics = run_retrieval(args.data, args.out, ks=ks, backend=backend, **common)
    for name, result in metrics["models"].items():
        precision = ", ".join(f"P@{k} {v:.3f}" for k, v in result["precision_at_k"].items())
        print(f"{name}: {precision}, MRR {result['mrr']:.3f} ({result['n_items']} items)")
    print(f"wrote {args.out}/: metrics.json, ranks.csv, precision_at_k.png")
    return 0
