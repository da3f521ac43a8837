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
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log progress to stderr, the libraries' info lines included",
    )
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
        raise ValueError(f"invalid FER_* configuration: {'; '.join(map(_problem, exc.errors()))}") from None


def _problem(error: dict) -> str:
    """One setting's problem: our validators' own sentence (without pydantic's "Value error, "), after
    the variable's name unless the sentence names the variables itself (a check across settings)."""
    cause = error.get("ctx", {}).get("error")
    message = str(cause) if error["type"] == "value_error" and cause is not None else error["msg"]
    name = "_".join(str(p) for p in error["loc"]).upper()
    return f"FER_{name}: {message}" if name else message


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
        print(f"fer: error: {_sentence(exc)}", file=sys.stderr)
        return 2


def _sentence(exc: Exception) -> str:
    """The error's own sentence; an OS error on a named file (a path given on the command line) says
    which file and what went wrong, without the errno."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.filename is not None:
        from model.files import unreadable

        return f"{exc.filename}: {unreadable(exc)}"
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
