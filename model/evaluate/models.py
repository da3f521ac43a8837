"""Which models an evaluation compares: `--models` entries -> named ModelSettings."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from model.projection import ProjectionError
from model.registry import PRESETS, MissingWeights
from model.settings import ModelSettings

# A preset entry is that preset as registered: the FER_* parts that would override it are cleared,
# so `--models exp-clip-b32,clip-b32` compares the two presets even with FER_PROJECTION set.
MODEL_PARTS = {"clip_model": None, "clip_weights": None, "projection": None, "preprocess": None}


@dataclass(frozen=True)
class ModelChoice:
    name: str  # how outputs name it: the preset, the projection file's stem, or "none"
    entry: str  # as given on the command line ("" = the configured model)
    settings: ModelSettings


def model_choices(models: str | None, base: ModelSettings) -> list[ModelChoice]:
    """Each entry is a preset name, or a FER_PROJECTION value on top of the FER_* settings: a
    projection file, or `none` (the configured CLIP without W). No entry: the configured model."""
    if not models or not models.strip():
        choice = ModelChoice(base.resolve().name, "", base)
        check_weights(choice)
        return [choice]
    choices = []
    for entry in (e.strip() for e in models.split(",")):
        if not entry:
            continue
        if entry in PRESETS:
            choice = ModelChoice(entry, entry, base.model_copy(update={"preset": entry, **MODEL_PARTS}))
        elif entry.lower() == "none" or Path(entry).is_file():
            choice = ModelChoice(Path(entry).stem, entry, base.model_copy(update={"projection": entry}))
        else:
            raise ValueError(
                f"--models entry {entry!r} is neither a preset ({', '.join(PRESETS)}) nor a projection file"
            )
        choices.append(choice)
    _refuse_shared_names(choices)
    if not choices:
        raise ValueError("--models is empty")
    for choice in choices:
        check_weights(choice)
    return choices


def _refuse_shared_names(choices: list[ModelChoice]) -> None:
    """A model's name keys its results and, as `slug`, names its files: two models with one would
    mix their results and overwrite each other's confusion matrices."""
    seen: dict[str, ModelChoice] = {}
    for choice in choices:
        other = seen.setdefault(slug(choice.name), choice)
        if other is not choice and other.entry == choice.entry:
            raise ValueError(f"--models names {choice.entry!r} twice")
        if other is not choice:
            raise ValueError(
                f"--models entries {other.entry!r} and {choice.entry!r} would both be named "
                f"{slug(choice.name)!r} in the outputs: rename one of the files"
            )


def check_weights(choice: ModelChoice) -> None:
    """Fails before any encoding when a model's files are not on disk or its projection does not fit
    its CLIP model, so a long evaluation does not die at its second model. The engine's own start-up
    checks (whose hint names the preset to download), saying which `--models` entry it is about."""
    try:
        choice.settings.resolve_checked()
    except (MissingWeights, ProjectionError) as exc:
        raise type(exc)(f"model {choice.name}: {exc}") from exc


def slug(name: str) -> str:
    """A file-name-safe form of a model or prompt-set name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"
