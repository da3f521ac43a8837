"""`fer weights download|list|verify`: the one way weights get onto a machine (never at request time)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.files import human_size


def add_commands(sub: argparse._SubParsersAction) -> None:
    weights = sub.add_parser("weights", help="download, list and verify model weight files")
    commands = weights.add_subparsers(dest="weights_command", required=True, metavar="ACTION")

    p = commands.add_parser("download", help="fetch a preset's weights into the weights folder")
    p.add_argument("presets", nargs="*", metavar="PRESET", help="default: FER_PRESET")
    _dir_option(p)
    p.add_argument(
        "--mirror",
        default=None,
        help="base URL (http, https or file) holding the official projection files (default: "
        "FER_WEIGHTS_MIRROR, "
        "else the official repository)",
    )
    p.set_defaults(handler=cmd_download)

    p = commands.add_parser("list", help="show each preset's files, what is present, and sizes")
    _dir_option(p)
    p.set_defaults(handler=cmd_list)

    p = commands.add_parser("verify", help="re-check present files; exit 1 on a mismatch")
    p.add_argument("presets", nargs="*", metavar="PRESET", help="default: all presets")
    _dir_option(p)
    p.set_defaults(handler=cmd_verify)


def _dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir", type=Path, default=None, help="weights folder (default: FER_WEIGHTS_DIR or weights)"
    )


def _weights_dir(args: argparse.Namespace, settings) -> Path:
    return args.dir if args.dir is not None else settings.weights_dir


def cmd_download(args: argparse.Namespace, settings) -> int:
    from model.weights.download import WeightsDownloadError, ensure
    from model.weights.store import preset_files

    weights_dir = _weights_dir(args, settings)
    presets = args.presets or [settings.preset]
    mirror = args.mirror or settings.weights_mirror
    if not args.verbose:
        _quiet_hub_client()
    for name in presets:
        files = preset_files(name, mirror)
        if not files:
            print(f"{name}: needs no weight files (random weights)")
        for file in files:
            print(f"{name}: {file.kind} from {file.source}", flush=True)
            try:
                path, fetched = ensure(file, weights_dir, name)
            except WeightsDownloadError as exc:
                print(f"fer weights: {exc}", file=sys.stderr)
                return 1
            size = human_size(path.stat().st_size)
            print(f"  {'downloaded and verified' if fetched else 'already present'}: {path} ({size})")
    return 0


def _quiet_hub_client() -> None:
    """The hub client logs each of its retries; the one error message `download` prints says it all."""
    try:
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:
        return
    hub_logging.set_verbosity_error()


def cmd_list(args: argparse.Namespace, settings) -> int:
    from model.registry import PRESETS
    from model.weights.store import locate, preset_files

    weights_dir = _weights_dir(args, settings)
    print(f"weights folder: {weights_dir.resolve()}")
    rows = [("PRESET", "FILE", "STATUS")]
    for name in PRESETS:
        files = preset_files(name)
        if not files:
            rows.append((name, "(none: random weights)", "-"))
        for file in files:
            path = locate(file, weights_dir)
            if path is None:
                rows.append((name, file.relpath, "missing"))
            else:
                rows.append(
                    (
                        name,
                        path.relative_to(weights_dir).as_posix(),
                        f"present {human_size(path.stat().st_size)}",
                    )
                )
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    for row in rows:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}")
    return 0


def cmd_verify(args: argparse.Namespace, settings) -> int:
    from model.registry import PRESETS
    from model.weights.store import check_file, locate, preset_files

    weights_dir = _weights_dir(args, settings)
    seen: set[str] = set()
    bad = checked = 0
    for name in args.presets or list(PRESETS):
        for file in preset_files(name):
            path = locate(file, weights_dir)
            if path is None or str(path) in seen:  # presets share CLIP files: hash each once
                continue
            seen.add(str(path))
            state = check_file(file, weights_dir)
            checked += 1
            bad += not state.ok
            print(f"{'ok ' if state.ok else 'BAD'}  {state.path}: {state.detail}")
    if not checked:
        print(f"no weight files to verify in {weights_dir}")
    if bad:
        print(
            f"fer weights: {bad} file(s) do not verify: run `fer weights download PRESET` to replace them",
            file=sys.stderr,
        )
    return 1 if bad else 0
