"""Named models, open_clip-style: one registry entry = CLIP architecture + weights + projection release +
preprocessing, and one resolver that turns (preset, overrides) into every file the loader reads.

The registry is plain data. `resolve_model` is the only place that decides where a file lives and the
only place that raises `MissingWeights`, with the one message that names the command which gets it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Literal

Preprocess = Literal["exp-clip", "clip"]

# The official Exp-CLIP repository at the commit the blob ids were read from.
EXP_CLIP_REPO = "zengqunzhao/Exp-CLIP"
EXP_CLIP_COMMIT = "23ace53ca7cebaaa3964ccbf526ea746c89aadba"
EXP_CLIP_RAW = f"https://raw.githubusercontent.com/{EXP_CLIP_REPO}/{EXP_CLIP_COMMIT}/checkpoint"

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# File layout of the weights folder: `fer weights download` writes here and the resolver reads here.
CLIP_SUBDIR = "clip"
CLIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
RANDOM = "random"  # seeded random weights or projection: the demo, benchmarks and tests
# What every answer of a model with random parts says beside its name (the demo preset's).
RANDOM_WEIGHTS_WARNING = "random weights: answers are meaningless"


class MissingWeights(FileNotFoundError):
    """Weights that are not on disk; the message names the command that gets them."""


@dataclass(frozen=True)
class ProjectionRelease:
    """An official projection file: its name, and the git blob id that verifies it."""

    filename: str
    blob_sha1: str

    def url(self, mirror: str | None = None) -> str:
        return f"{(mirror or EXP_CLIP_RAW).rstrip('/')}/{self.filename}"


@dataclass(frozen=True)
class Preset:
    name: str
    clip_model: str  # open_clip architecture name
    clip_weights: str  # open_clip pretrained tag, or RANDOM
    projection: ProjectionRelease | str | None  # a release, RANDOM, or None for plain CLIP
    preprocess: Preprocess
    summary: str


B32 = ProjectionRelease("ExpCLIP_B32_model.pth", "c7d28eb6c9665e709d9d6a422864a9d5713432f3")
B16 = ProjectionRelease("ExpCLIP_B16_model.pth", "6f2b877fec83699e17283a511002376d117ce45f")
L14 = ProjectionRelease("ExpCLIP_L14_model.pth", "febcf3447362f5b3654de12f89b2185414d62ec8")

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("exp-clip-b32", "ViT-B-32", "openai", B32, "exp-clip", "Exp-CLIP, ViT-B/32"),
        Preset("exp-clip-b16", "ViT-B-16", "openai", B16, "exp-clip", "Exp-CLIP, ViT-B/16"),
        Preset("exp-clip-l14", "ViT-L-14", "openai", L14, "exp-clip", "Exp-CLIP, ViT-L/14"),
        Preset("clip-b32", "ViT-B-32", "openai", None, "clip", "plain CLIP baseline, ViT-B/32"),
        Preset("clip-b16", "ViT-B-16", "openai", None, "clip", "plain CLIP baseline, ViT-B/16"),
        Preset("clip-l14", "ViT-L-14", "openai", None, "clip", "plain CLIP baseline, ViT-L/14"),
        Preset(
            "demo",
            "fer-tiny",
            RANDOM,
            RANDOM,
            "exp-clip",
            "a tiny CLIP with seeded RANDOM weights: serves offline, predictions are meaningless",
        ),
    )
}
DEFAULT_PRESET = "exp-clip-b32"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}") from None


@cache
def open_clip_models():
    """open_clip, with the project's own architectures (the tiny demo/test CLIP) known to it by name.
    Imported on first use: it imports torch, which settings and `fer --help` do without."""
    import open_clip

    with resources.as_file(resources.files("model") / "configs") as path:
        open_clip.add_model_config(path)
    return open_clip


# ---- the file layout ------------------------------------------------------------------------------
def clip_checkpoint_stem(clip_model: str, tag: str) -> str:
    return f"{clip_model}__{tag}"


def find_clip_checkpoint(weights_dir: Path, clip_model: str, tag: str) -> Path | None:
    """Where `fer weights download` puts an open_clip tag's weights, if they are there."""
    stem = Path(weights_dir) / CLIP_SUBDIR / clip_checkpoint_stem(clip_model, tag)
    for suffix in CLIP_SUFFIXES:
        if stem.with_suffix(suffix).is_file():
            return stem.with_suffix(suffix)
    return None


def projection_path(weights_dir: Path, release: ProjectionRelease) -> Path:
    return Path(weights_dir) / release.filename


# ---- resolving a choice into files -----------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A fully resolved model: every file the loader reads, and how to preprocess for it."""

    name: str  # the preset's name, or "custom" once a part overrides it
    clip_model: str
    clip_weights: str  # what was asked for: an open_clip tag, a checkpoint path, or RANDOM
    clip_checkpoint: Path | None  # the file; None = seeded random init
    quick_gelu: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # of the `clip` preprocessing: "bicubic" / "bilinear"
    projection: Path | str | None  # a file, RANDOM, or None (plain CLIP)
    preprocess: Preprocess

    @property
    def warning(self) -> str | None:
        """Set when the answers cannot mean anything: random CLIP weights or a random projection."""
        random = self.clip_checkpoint is None or self.projection == RANDOM
        return RANDOM_WEIGHTS_WARNING if random else None

    def without_projection(self) -> ModelSpec:
        """The same CLIP without W: what training fits W on."""
        return replace(self, projection=None)


def resolve_model(
    preset: str,
    weights_dir: Path,
    *,
    clip_model: str | None = None,
    clip_weights: str | None = None,
    projection: str | None = None,
    preprocess: Preprocess | None = None,
) -> ModelSpec:
    """A preset with optional overrides of its parts -> every path. Checks that every file is on disk
    (nothing is loaded), so a missing one fails at start-up with the command that gets it."""
    entry = get_preset(preset)
    model = clip_model or entry.clip_model
    weights = clip_weights or entry.clip_weights
    overridden = (
        model != entry.clip_model
        or weights != entry.clip_weights
        or projection is not None
        or (preprocess or entry.preprocess) != entry.preprocess
    )
    name = "custom" if overridden else entry.name
    source = _clip_source(model, weights, Path(weights_dir), entry)
    return ModelSpec(
        name=name,
        clip_model=model,
        clip_weights=weights,
        projection=_projection(projection, entry, Path(weights_dir)),
        preprocess=preprocess or entry.preprocess,
        **source,
    )


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or Path(value).suffix in CLIP_SUFFIXES


def _clip_source(model: str, weights: str, weights_dir: Path, entry: Preset) -> dict:
    defaults = {"quick_gelu": False, "mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic"}
    open_clip = open_clip_models()
    if open_clip.get_model_config(model) is None:
        raise ValueError(f"unknown open_clip architecture {model!r}")
    if weights == RANDOM:
        return {**defaults, "clip_checkpoint": None}
    if _looks_like_path(weights):
        if not Path(weights).is_file():
            raise MissingWeights(f"CLIP checkpoint {weights} does not exist")
        return {**defaults, "clip_checkpoint": Path(weights)}
    tag = open_clip.get_pretrained_cfg(model, weights)
    if not tag:
        known = open_clip.list_pretrained_tags_by_model(model)
        raise ValueError(f"{model} has no pretrained tag {weights!r}; known tags: {known}")
    checkpoint = find_clip_checkpoint(weights_dir, model, weights)
    if checkpoint is None:
        owner = _preset_with_clip(model, weights, entry)
        raise missing_weights(f"CLIP weights {model}/{weights} are not in {weights_dir}/", owner)
    return {
        "clip_checkpoint": checkpoint,
        "quick_gelu": bool(tag.get("quick_gelu", False)),
        "mean": tuple(tag.get("mean", OPENAI_MEAN)),
        "std": tuple(tag.get("std", OPENAI_STD)),
        "interpolation": tag.get("interpolation", "bicubic"),
    }


def _preset_with_clip(model: str, tag: str, entry: Preset) -> str | None:
    """The preset whose download brings these CLIP weights (the configured one first)."""
    owners = [p.name for p in PRESETS.values() if p.clip_model == model and p.clip_weights == tag]
    return entry.name if entry.name in owners else (owners[0] if owners else None)


def _projection(choice: str | None, entry: Preset, weights_dir: Path) -> Path | str | None:
    """`none` -> plain CLIP; a preset name -> that preset's file in the weights folder; else a path."""
    if choice is None:
        value: ProjectionRelease | str | None = entry.projection
        owner: str | None = entry.name
    elif choice.lower() == "none":
        return None
    elif choice in PRESETS:
        value, owner = PRESETS[choice].projection, choice
    else:
        value, owner = choice, None
    if value is None or value == RANDOM:
        return value
    path = projection_path(weights_dir, value) if isinstance(value, ProjectionRelease) else Path(value)
    if not path.is_file():
        raise missing_weights(
            f"projection file {path} is missing", owner, "set FER_PROJECTION to a file or `none`"
        )
    return path


def missing_weights(what: str, preset: str | None, alternative: str | None = None) -> MissingWeights:
    """The one message for weights that are not on disk: what is missing and the command that gets it
    (only a registered preset's files can be downloaded)."""
    remedies = []
    if preset is not None:
        remedies.append(f"run `fer weights download {preset}` (needs internet once)")
    remedies.append(alternative or "set FER_CLIP_WEIGHTS to a local file")
    return MissingWeights(f"{what}: {', or '.join(remedies)}")
