"""The one learned piece of Exp-CLIP: a bias-free linear map W (D -> 4096) on top of both CLIP encoders.

Two file formats load here:
- the official checkpoints (`torch.save` dict, one float32 tensor whose key ends in `mlp.weight`,
  shape [4096, D], keys possibly prefixed `module.` / `projection_head.`), read with weights_only=True;
- this project's own: safetensors with a tensor `weight` [out, D] and string metadata saying which
  CLIP model and preprocessing it was trained for and how (`fer train fit` writes it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from model.files import write_bytes_atomic
from model.registry import PRESETS, ProjectionRelease

FORMAT = "exp-clip-fer/projection"
FORMAT_VERSION = "1"
# An official file records no CLIP model: its release name says which one it was trained for.
OFFICIAL_CLIP = {
    p.projection.filename: p.clip_model
    for p in PRESETS.values()
    if isinstance(p.projection, ProjectionRelease)
}


class ProjectionError(ValueError):
    """A projection file that cannot serve the configured CLIP model; the message says why."""


@dataclass
class ProjectionFile:
    weight: torch.Tensor  # [out_dim, in_dim], float32
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def in_dim(self) -> int:
        return self.weight.shape[1]


def load_projection(path: str | Path) -> ProjectionFile:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"projection file {path} does not exist")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    return _load_official(path)


def _load_official(path: Path) -> ProjectionFile:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a non-pickle, a truncated file, or a pickle with code in it
        raise ProjectionError(f"{path} is not a loadable weights-only torch checkpoint") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ProjectionError(f"{path} holds a {type(state).__name__}, not a state dict")
    keys = [k for k, v in state.items() if k.endswith("mlp.weight") and isinstance(v, torch.Tensor)]
    if len(keys) != 1:
        raise ProjectionError(
            f"{path}: expected exactly one tensor whose key ends in 'mlp.weight', found {keys or 'none'}"
        )
    weight = state[keys[0]]
    if weight.ndim != 2:
        raise ProjectionError(f"{path}: {keys[0]} has shape {list(weight.shape)}, expected [out, in]")
    metadata = {"format": "exp-clip-official", "key": keys[0]}
    if path.name in OFFICIAL_CLIP:
        metadata["clip_model"] = OFFICIAL_CLIP[path.name]
    return ProjectionFile(weight.float().contiguous(), metadata)


def _load_safetensors(path: Path) -> ProjectionFile:
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        names = list(f.keys())
        if "weight" not in names:
            raise ProjectionError(f"{path}: no tensor named 'weight' (found {names})")
        weight = f.get_tensor("weight")
    if metadata.get("format") != FORMAT:
        raise ProjectionError(f"{path}: metadata format is {metadata.get('format')!r}, expected {FORMAT!r}")
    if weight.ndim != 2:
        raise ProjectionError(f"{path}: weight has shape {list(weight.shape)}, expected [out, in]")
    return ProjectionFile(weight.float().contiguous(), metadata)


def save_projection(
    path: str | Path,
    weight: torch.Tensor,
    *,
    clip_model: str,
    preprocess: str,
    training: dict | None = None,
) -> Path:
    """Writes the project's format; `training` (config, data fingerprint, ...) is stored as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weight = weight.detach().float().cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "clip_model": clip_model,
        "input_dim": str(weight.shape[1]),
        "output_dim": str(weight.shape[0]),
        "preprocess": preprocess,
        "training": json.dumps(training or {}, sort_keys=True),
    }
    write_bytes_atomic(path, save({"weight": weight}, metadata=metadata))
    return path


def check_compatible(
    projection: ProjectionFile, clip_embed_dim: int, source: str, clip_model: str, *, any_clip: bool = False
) -> None:
    """A W that does not fit the CLIP embedding is a start-up error naming both shapes; so is one made
    for another CLIP model (ViT-B/32 and B/16 both embed to 512-d), unless `any_clip` says that is meant."""
    if projection.in_dim != clip_embed_dim:
        raise ProjectionError(
            f"projection {source} maps {projection.in_dim}-d features but the CLIP model embeds to "
            f"{clip_embed_dim}-d: pick the projection trained for this CLIP model"
        )
    made_for = projection.metadata.get("clip_model")
    if made_for is not None and _architecture(made_for) != _architecture(clip_model) and not any_clip:
        raise ProjectionError(
            f"projection {source} was made for CLIP {made_for}, not {clip_model}: pick the projection "
            "trained for this CLIP model, or set FER_PROJECTION_ANY_CLIP=true to use it anyway"
        )


def _architecture(clip_model: str) -> str:
    """The weights' layout a name stands for: `-quickgelu` changes the activation only (an OpenAI
    checkpoint loaded by path is named so)."""
    return clip_model.removesuffix("-quickgelu")
