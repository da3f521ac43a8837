"""Named model presets: one registry entry = CLIP architecture + weights + projection + preprocessing.

Shaped like open_clip's pretrained registry (plain data). The official projections' download
facts (METHOD.md section 8) live here too, so `fer weights` and the loader read one table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The official Exp-CLIP repository at the commit the blob ids were read from.
EXP_CLIP_REPO = "zengqunzhao/Exp-CLIP"
EXP_CLIP_COMMIT = "23ace53ca7cebaaa3964ccbf526ea746c89aadba"
EXP_CLIP_RAW = f"https://raw.githubusercontent.com/{EXP_CLIP_REPO}/{EXP_CLIP_COMMIT}/checkpoint"


@dataclass(frozen=True)
class ProjectionRelease:
    """An official projection file: where it comes from and the git blob id that verifies it."""

    filename: str
    blob_sha1: str

    @property
    def url(self) -> str:
        return f"{EXP_CLIP_RAW}/{self.filename}"


@dataclass(frozen=True)
class Preset:
    name: str
    clip_model: str  # open_clip architecture name
    clip_weights: str  # open_clip pretrained tag ("random" = seeded random init, for the demo)
    projection: str | None  # key of PROJECTION_RELEASES, "random", or None for plain CLIP
    preprocess: str  # "exp-clip" or "clip"
    summary: str


PROJECTION_RELEASES: dict[str, ProjectionRelease] = {
    "exp-clip-b32": ProjectionRelease("ExpCLIP_B32_model.pth", "c7d28eb6c9665e709d9d6a422864a9d5713432f3"),
    "exp-clip-b16": ProjectionRelease("ExpCLIP_B16_model.pth", "6f2b877fec83699e17283a511002376d117ce45f"),
    "exp-clip-l14": ProjectionRelease("ExpCLIP_L14_model.pth", "febcf3447362f5b3654de12f89b2185414d62ec8"),
}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("exp-clip-b32", "ViT-B-32", "openai", "exp-clip-b32", "exp-clip", "Exp-CLIP, ViT-B/32"),
        Preset("exp-clip-b16", "ViT-B-16", "openai", "exp-clip-b16", "exp-clip", "Exp-CLIP, ViT-B/16"),
        Preset("exp-clip-l14", "ViT-L-14", "openai", "exp-clip-l14", "exp-clip", "Exp-CLIP, ViT-L/14"),
        Preset("clip-b32", "ViT-B-32", "openai", None, "clip", "plain CLIP baseline, ViT-B/32"),
        Preset("clip-b16", "ViT-B-16", "openai", None, "clip", "plain CLIP baseline, ViT-B/16"),
        Preset("clip-l14", "ViT-L-14", "openai", None, "clip", "plain CLIP baseline, ViT-L/14"),
        Preset(
            "demo",
            "fer-tiny",
            "random",
            "random",
            "exp-clip",
            "a tiny CLIP with seeded RANDOM weights: serves offline, predictions are meaningless",
        ),
    )
}
DEFAULT_PRESET = "exp-clip-b32"

CLIP_SUBDIR = "clip"
CLIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def clip_checkpoint_stem(clip_model: str, tag: str) -> str:
    return f"{clip_model}__{tag}"


def find_clip_checkpoint(weights_dir: Path, clip_model: str, tag: str) -> Path | None:
    """Where `fer weights download` puts an open_clip tag's weights, if they are there."""
    stem = Path(weights_dir) / CLIP_SUBDIR / clip_checkpoint_stem(clip_model, tag)
    for suffix in CLIP_SUFFIXES:
        if stem.with_suffix(suffix).is_file():
            return stem.with_suffix(suffix)
    return None


def projection_path(weights_dir: Path, release_key: str) -> Path:
    return Path(weights_dir) / PROJECTION_RELEASES[release_key].filename


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}") from None
