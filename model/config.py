"""Model selection from the environment (`FER_*`): the one place the CLI and the service read it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.presets import DEFAULT_PRESET, PRESETS, get_preset, projection_path

if TYPE_CHECKING:
    import torch

Preprocess = Literal["exp-clip", "clip"]
Dtype = Literal["auto", "float32", "float16", "bfloat16"]


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
    `FER_PREPROCESS` override its parts; `FER_DEVICE` and `FER_DTYPE` say where and in what precision
    the CLIP encoders run."""

    model_config = SettingsConfigDict(env_prefix="FER_", extra="ignore")

    preset: str = DEFAULT_PRESET
    clip_model: str | None = None
    clip_weights: str | None = None
    projection: str | None = None
    preprocess: Preprocess | None = None
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Dtype = "auto"
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


def dtype_for(choice: str, device: str) -> torch.dtype:
    """The CLIP encoders' precision. `auto`: float16 on CUDA; on CPU bfloat16 where the CPU computes it
    natively (AVX512-BF16 or AMX; the README's "Precision" gives the measured speed-up), else float32.
    W and the scores stay float32 whatever the choice."""
    import torch

    if choice == "auto":
        if device == "cuda":
            return torch.float16
        return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32
    if choice == "float16" and device != "cuda":
        raise RuntimeError("FER_DTYPE=float16 runs on CUDA only; on CPU use bfloat16 or float32")
    return getattr(torch, choice)


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype as FER_DTYPE (and `fer train --dtype`) spell it, e.g. `bfloat16`."""
    return str(dtype).removeprefix("torch.")


def _cpu_has_native_bf16() -> bool:
    import torch

    try:  # oneDNN's own check (AVX512-BF16 / AMX); a private op, so absent means "no"
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
