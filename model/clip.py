"""Loading the frozen CLIP encoders through open_clip, and the two preprocessing recipes.

Nothing here downloads: a pretrained tag resolves to the file `fer weights download` put in the
weights folder, and a missing file is a MissingWeightsError naming that command.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import open_clip
import torch
from PIL import Image
from torchvision import transforms as T

from model.presets import PRESETS, find_clip_checkpoint

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
RANDOM_SEED = 0


class MissingWeightsError(FileNotFoundError):
    """Weights that are not on disk; the message names the command that gets them."""


def register_bundled_configs() -> None:
    """Makes the project's own architectures (the tiny demo/test CLIP) known to open_clip by name."""
    config_dir = resources.files("model") / "configs"
    with resources.as_file(config_dir) as path:
        open_clip.add_model_config(path)


register_bundled_configs()


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bicubic" / "bilinear"


@dataclass
class LoadedClip:
    model: torch.nn.Module
    tokenizer: object
    embed_dim: int
    preprocess: PreprocessConfig


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or Path(value).suffix in {".pt", ".pth", ".bin", ".safetensors"}


def _hint(clip_model: str, tag: str, preset: str | None) -> str:
    presets = [p.name for p in PRESETS.values() if p.clip_model == clip_model and p.clip_weights == tag]
    target = preset if preset in presets else (presets[0] if presets else "PRESET")
    return (
        f"run `fer weights download {target}` (needs internet once), or set FER_CLIP_WEIGHTS to a local file"
    )


@dataclass(frozen=True)
class ClipSource:
    checkpoint: Path | None  # None: seeded random init
    quick_gelu: bool = False
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"


def resolve_clip_source(
    clip_model: str, clip_weights: str, weights_dir: Path, preset: str | None = None
) -> ClipSource:
    """Where the weights come from, without loading them: `clip_weights` is an open_clip tag (found in
    the weights folder), a checkpoint path, or `random`. Missing files raise MissingWeightsError."""
    if open_clip.get_model_config(clip_model) is None:
        raise ValueError(f"unknown open_clip architecture {clip_model!r}")
    if clip_weights == "random":
        return ClipSource(None)
    if _looks_like_path(clip_weights):
        if not Path(clip_weights).is_file():
            raise MissingWeightsError(f"CLIP checkpoint {clip_weights} does not exist")
        return ClipSource(Path(clip_weights))
    tag_cfg = open_clip.get_pretrained_cfg(clip_model, clip_weights)
    if not tag_cfg:
        known = open_clip.list_pretrained_tags_by_model(clip_model)
        raise ValueError(f"{clip_model} has no pretrained tag {clip_weights!r}; known tags: {known}")
    checkpoint = find_clip_checkpoint(weights_dir, clip_model, clip_weights)
    if checkpoint is None:
        raise MissingWeightsError(
            f"CLIP weights {clip_model}/{clip_weights} are not in {weights_dir}/: {_hint(clip_model, clip_weights, preset)}"
        )
    return ClipSource(
        checkpoint,
        bool(tag_cfg.get("quick_gelu", False)),
        tuple(tag_cfg.get("mean", OPENAI_MEAN)),
        tuple(tag_cfg.get("std", OPENAI_STD)),
        tag_cfg.get("interpolation", "bicubic"),
    )


def load_clip(clip_model: str, clip_weights: str, weights_dir: Path) -> LoadedClip:
    source = resolve_clip_source(clip_model, clip_weights, weights_dir)
    checkpoint = source.checkpoint
    if checkpoint is None:
        torch.manual_seed(RANDOM_SEED)
    log.info("loading CLIP %s from %s", clip_model, checkpoint or "seeded random init")
    model = open_clip.create_model(
        clip_model,
        pretrained=str(checkpoint) if checkpoint else None,
        force_quick_gelu=source.quick_gelu,
        load_weights=True,
    )
    model.eval().requires_grad_(False)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, tuple | list) else image_size
    return LoadedClip(
        model=model,
        tokenizer=open_clip.get_tokenizer(clip_model),
        embed_dim=int(model.visual.output_dim),
        preprocess=PreprocessConfig(int(image_size), source.mean, source.std, source.interpolation),
    )


def pil_transform(kind: str, cfg: PreprocessConfig) -> T.Compose:
    """The CPU half of preprocessing: PIL image -> uint8 [3, S, S]. The float conversion and the
    optional mean/std run on the device (see `Normaliser`) so uploads to the GPU stay uint8.

    `exp-clip`: the official evaluation transform, Resize((S, S)) (squash, bilinear) then ToTensor.
    `clip`: the model's standard transform, resize shortest side + centre crop (open_clip's default).
    """
    if kind == "exp-clip":
        steps = [T.Resize((cfg.image_size, cfg.image_size))]
    elif kind == "clip":
        mode = T.InterpolationMode.BICUBIC if cfg.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
        steps = [T.Resize(cfg.image_size, interpolation=mode), T.CenterCrop(cfg.image_size)]
    else:
        raise ValueError(f"unknown preprocessing {kind!r}: use 'exp-clip' or 'clip'")
    return T.Compose([_to_rgb, *steps, T.PILToTensor()])


def _to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


class Normaliser(torch.nn.Module):
    """uint8 [N, 3, S, S] -> float in [0, 1], then CLIP mean/std for `clip`, nothing more for `exp-clip`."""

    def __init__(self, kind: str, cfg: PreprocessConfig):
        super().__init__()
        self.standardise = kind == "clip"
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float().div_(255.0)
        return (x - self.mean) / self.std if self.standardise else x
