"""Loading the frozen CLIP encoders through open_clip, and the two preprocessing recipes.

Nothing here downloads or looks for files: `model.registry.resolve_model` has found the checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision import transforms as T

from model.registry import ModelSpec, open_clip_models

log = logging.getLogger(__name__)

RANDOM_SEED = 0


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


def load_clip(spec: ModelSpec) -> LoadedClip:
    open_clip = open_clip_models()
    checkpoint = spec.clip_checkpoint
    if checkpoint is None:
        torch.manual_seed(RANDOM_SEED)
    log.info("loading CLIP %s from %s", spec.clip_model, checkpoint or "seeded random init")
    with _without_random_init_notice():
        model = open_clip.create_model(
            spec.clip_model,
            pretrained=str(checkpoint) if checkpoint else None,
            force_quick_gelu=spec.quick_gelu,
            load_weights=True,
        )
    model.eval().requires_grad_(False)
    return LoadedClip(
        model=model,
        tokenizer=open_clip.get_tokenizer(spec.clip_model),
        embed_dim=int(model.visual.output_dim),
        preprocess=preprocess_config(spec),
    )


class _RandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


@contextmanager
def _without_random_init_notice():
    """open_clip warns on the root logger whenever it builds a model without weights; random weights
    are asked for here (the demo preset, tests, benchmarks) and every answer says so already."""
    notice = _RandomInitNotice()
    logging.getLogger().addFilter(notice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(notice)


def preprocess_config(spec: ModelSpec) -> PreprocessConfig:
    """What `load_clip` gives as `preprocess`, from the architecture's config alone: for processes that
    prepare pixels without holding the model (Ray's decode actors)."""
    size = open_clip_models().get_model_config(spec.clip_model)["vision_cfg"]["image_size"]
    size = size[0] if isinstance(size, tuple | list) else size
    return PreprocessConfig(int(size), spec.mean, spec.std, spec.interpolation)


def clip_transform(spec: ModelSpec) -> T.Compose:
    """The engine's `prepare_transform` for `spec`, without loading any weights."""
    return pil_transform(spec.preprocess, preprocess_config(spec))


@dataclass(frozen=True)
class ToPixels:
    """PIL images -> the encoder's uint8 input [N, 3, S, S]: the preprocessing that the pipeline's CPU
    stages (model.pipeline) and training's loaders take. A plain picklable value, so DataLoader workers
    and Ray's decode actors hold it without the model."""

    transform: Callable[[Image.Image], torch.Tensor]  # one image (`pil_transform`)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in images])


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

    def extra_repr(self) -> str:  # what it computes, which its weights (none) do not show
        return f"standardise={self.standardise}, mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float().div_(255.0)
        return (x - self.mean) / self.std if self.standardise else x
