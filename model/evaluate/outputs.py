"""An evaluation's output folder holds one run: an earlier run's files are removed when a run starts,
and the summaries are rewritten after each model, so a run that stops early still leaves the models it
finished (and says which it did not), never a mix of two runs."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from model.files import write_text_atomic

log = logging.getLogger(__name__)


def start_outputs(out: Path, patterns: Sequence[str]) -> None:
    """Creates `out`, removing the files an earlier run of the same command wrote there (`patterns`:
    the command's own file names, so nothing else in the folder is touched)."""
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted({path for pattern in patterns for path in out.glob(pattern) if path.is_file()})
    for path in stale:
        path.unlink()
    if stale:
        log.info("removed %d files of an earlier run from %s", len(stale), out)


def write_json(path: Path, data: dict, **dumps) -> None:
    """Whole or not at all: a summary rewritten after each model is never read half-written."""
    write_text_atomic(path, json.dumps(data, indent=2, **dumps) + "\n")
