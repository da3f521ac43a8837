"""`fer train extract|fit|run`: retrain the projection W from the BLIP-2 teacher (docs/method.md).

The CLIP side is configured like everything else, by FER_* (FER_PRESET / FER_CLIP_MODEL /
FER_CLIP_WEIGHTS / FER_PREPROCESS / FER_DEVICE; FER_PROJECTION is ignored: the raw CLIP embedding is
what W is trained on). Each command prints one JSON summary on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from cli.cluster import add_ray_options, ray_options
from model.train.config import DEFAULT_INSTRUCTION, DEFAULT_TEACHER, INSTRUCTIONS, FitConfig

DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


def add_commands(subparsers) -> None:
    train = subparsers.add_parser("train", help="retrain the projection from an LLM teacher (offline)")
    sub = train.add_subparsers(dest="train_command", required=True, metavar="STEP")

    p = sub.add_parser("extract", help="cache CLIP embeddings + teacher features of unlabelled face images")
    _add_extract_options(p)
    p.set_defaults(handler=cmd_extract)

    p = sub.add_parser("fit", help="train W on a feature cache (symmetric InfoNCE)")
    p.add_argument("--cache", type=Path, required=True, help="a folder written by `fer train extract`")
    _add_fit_options(p)
    p.set_defaults(handler=cmd_fit)

    p = sub.add_parser("run", help="extract, then fit")
    _add_extract_options(p)
    _add_fit_options(p)
    p.set_defaults(handler=cmd_run)


def _add_extract_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=Path, required=True, help="a folder (recursive) or a file listing images")
    p.add_argument(
        "--cache", type=Path, required=True, help="output folder; rerun to resume an interrupted run"
    )
    p.add_argument(
        "--teacher",
        default=DEFAULT_TEACHER,
        help=f"BLIP-2 Flan-T5: a local folder or a hub id already in the HF cache (default {DEFAULT_TEACHER})",
    )
    p.add_argument(
        "--instruction",
        default=DEFAULT_INSTRUCTION,
        help=f"{', '.join(INSTRUCTIONS)} (default {DEFAULT_INSTRUCTION}) or free text",
    )
    p.add_argument("--extract-batch-size", type=int, default=32, help="images per teacher batch (default 32)")
    p.add_argument("--shard-size", type=int, default=1024, help="images per cache shard (default 1024)")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="image decoding processes")
    p.add_argument(
        "--dtype",
        default="auto",
        help="teacher dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, float16, bfloat16",
    )
    add_ray_options(p, gpus_default="0.5, a CLIP and a teacher actor share one")


def _add_fit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="the projection file to write (.safetensors)")
    for f in dataclasses.fields(FitConfig):
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(f.default),
            default=f.default,
            help=f"default {f.default}",
        )


def _check_out(out: Path) -> None:
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: the projection file must end in .safetensors")


def _fit_config(args: argparse.Namespace) -> FitConfig:
    """The fit options as a FitConfig, which refuses a value that would train nothing."""
    return FitConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FitConfig)})


def _check_extract(args: argparse.Namespace) -> None:
    """Before the teacher (minutes to load) or the CLIP loads."""
    for option in ("extract_batch_size", "shard_size"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be at least 1")
    if args.workers < 0:
        raise ValueError("--workers must be at least 0 (0: decode in this process)")


def _device(settings) -> str:
    from model.settings import device_for

    return device_for(settings.device)


def cmd_extract(args: argparse.Namespace, settings) -> int:
    from model.cluster import for_workers
    from model.train.extract import extract, list_images
    from model.train.teacher import Teacher

    _check_extract(args)
    images = list_images(args.images)
    # The files by their absolute paths in both modes: Ray's actors do not run in this folder, and the
    # cache records the paths, so with one spelling either mode resumes the other's cache.
    settings, teacher = for_workers(settings), _teacher_source(args.teacher)
    options = ray_options(args)
    if options is not None:
        summary = _extract_on_ray(args, settings, teacher, images, options)
    else:
        summary = extract(
            images,
            args.cache,
            settings.model_copy(update={"projection": "none"}).resolve(),  # W is what gets trained
            Teacher.load(teacher, args.instruction, _device(settings), args.dtype),
            batch_size=args.extract_batch_size,
            shard_size=args.shard_size,
            workers=args.workers,
            clip_dtype=settings.dtype,
        )
    print(json.dumps(dataclasses.asdict(summary)), flush=True)
    return 0


def _teacher_source(teacher: str) -> str:
    """A local teacher folder by its absolute path; a hub id as given."""
    return str(Path(teacher).resolve()) if Path(teacher).is_dir() else teacher


def _extract_on_ray(args: argparse.Namespace, settings, teacher: str, images: list[str], options):
    from model.train.distributed import TeacherChoice, extract_on_ray

    return extract_on_ray(
        images,
        args.cache,
        settings,
        TeacherChoice(teacher, args.instruction, args.dtype),
        batch_size=args.extract_batch_size,
        shard_size=args.shard_size,
        options=options,
    )


def cmd_fit(args: argparse.Namespace, settings) -> int:
    from model.train.fit import fit

    _check_out(args.out)
    result = fit(args.cache, args.out, _fit_config(args), _device(settings))
    print(
        json.dumps(
            {
                "projection": result.projection,
                "train_pairs": result.train_pairs,
                "val_pairs": result.val_pairs,
                "first_loss": result.first_loss,
                **result.final,
            }
        ),
        flush=True,
    )
    return 0


def cmd_run(args: argparse.Namespace, settings) -> int:
    _check_out(args.out)  # before the long extraction, not after it
    _fit_config(args)  # likewise the fit's options
    return cmd_extract(args, settings) or cmd_fit(args, settings)
