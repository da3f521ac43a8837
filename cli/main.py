"""`fer`: builds the parser from the command modules, then the process's one settings object (FER_*),
and runs the chosen command with it. Errors a user can fix are one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

COMMAND_MODULES: tuple[str, ...] = ("cli.predict", "cli.serve", "cli.evaluate", "cli.train", "cli.weights")
# Which settings a command reads: the service's (a superset) only where it runs the service, so a
# service-only setting cannot stop `fer predict`. Imported lazily: they import av, PIL and
# pydantic-settings, which `fer --help` does without.
SETTINGS = {"model": ("model.settings", "ModelSettings"), "service": ("service.settings", "ServiceSettings")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fer", description="Zero-shot facial-expression recognition (Exp-CLIP)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def load_settings(kind: str):
    """The FER_* settings, validated once; a bad value is a one-line error naming the variable."""
    from pydantic import ValidationError

    module, name = SETTINGS[kind]
    try:
        return getattr(importlib.import_module(module), name)()
    except ValidationError as exc:
        problems = "; ".join(_problem(error) for error in exc.errors())
        raise ValueError(f"invalid FER_* configuration: {problems}") from None


def _problem(error: dict) -> str:
    """One setting's error as `FER_NAME: what`; a check across settings says in its own sentence which
    variables it is about (pydantic's "Value error, " prefix dropped)."""
    if not error["loc"]:
        return str(error.get("ctx", {}).get("error", error["msg"]))
    return f"FER_{'_'.join(str(p) for p in error['loc']).upper()}: {error['msg']}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        settings = load_settings(getattr(args, "settings", "model"))
        return int(args.handler(args, settings) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Configuration errors (unknown preset, missing weights, bad class list): one line, no traceback.
        print(f"fer: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
