"""Model selection from the environment (`FER_*`): the one place the CLI and the service read it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.presets import DEFAULT_PRESET, PRESETS, get_preset, projection_path

Preprocess = Literal["exp-clip", "clip"]


@dataclass(frozen=True)
class ModelSpec:
    """A fully resolved model choice: what the loader builds."""

    name: str  # the preset name, or "custom" once any field overrides it
    clip_model: str
    clip_weights: str  # an open_clip tag, "random", or a checkpoint path
    projection: str | None  # a file path, "random", or None (plain CLIP)
    preprocess: Preprocess
    weights_dir: Path


class ModelSettings(BaseSettings):
    """`FER_PRESET` picks a bundle; `FER_CLIP_MODEL` / `FER_CLIP_WEIGHTS` / `FER_PROJECTION` /
    `FER_PREPROCESS` override its parts."""

    model_config = SettingsConfigDict(env_prefix="FER_", extra="ignore")

    preset: str = DEFAULT_PRESET
    clip_model: str | None = None
    clip_weights: str | None = None
    projection: str | None = None
    preprocess: Preprocess | None = None
    device: Literal["auto", "cuda", "cpu"] = "auto"
    weights_dir: Path = Path("weights")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        get_preset(value)
        return value

    def resolve(self) -> ModelSpec:
        preset = get_preset(self.preset)
        projection = self._resolve_projection(preset.projection)
        spec = ModelSpec(
            name=preset.name,
            clip_model=self.clip_model or preset.clip_model,
            clip_weights=self.clip_weights or preset.clip_weights,
            projection=projection,
            preprocess=self.preprocess or preset.preprocess,
            weights_dir=self.weights_dir,
        )
        overridden = (
            spec.clip_model != preset.clip_model
            or spec.clip_weights != preset.clip_weights
            or spec.preprocess != preset.preprocess
            or self.projection is not None
        )
        return spec if not overridden else ModelSpec(**{**spec.__dict__, "name": "custom"})

    def _resolve_projection(self, preset_projection: str | None) -> str | None:
        """`none` -> plain CLIP; a preset name -> that preset's file in the weights folder; else a path."""
        choice = self.projection if self.projection is not None else preset_projection
        if choice is None or choice.lower() == "none":
            return None
        if choice == "random":
            return "random"
        if choice in PRESETS:
            release = PRESETS[choice].projection
            if release is None or release == "random":
                return release
            return str(projection_path(self.weights_dir, release))
        return choice


def device_for(choice: str) -> str:
    """`auto` -> CUDA when there is one; `cuda` without one is an error, not a silent CPU fallback."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("FER_DEVICE=cuda but torch sees no CUDA device; use FER_DEVICE=auto or cpu")
    return choice
