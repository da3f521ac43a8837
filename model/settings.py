"""The FER_* settings of the model and its pipeline. A process entry point (the `fer` command, the ASGI
app, a Ray replica) builds one settings object and passes it down; library code reads no environment."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.faces.factory import DetectorName
from model.media import DEFAULT_LIMITS, MediaLimits
from model.options import PipelineOptions
from model.registry import DEFAULT_PRESET, ModelSpec, Preprocess, get_preset, open_clip_models, resolve_model

if TYPE_CHECKING:
    import torch

Dtype = Literal["auto", "float32", "float16", "bfloat16"]
Backend = Literal["torch", "openvino"]
DEVICE_CHOICE = re.compile(r"auto|cpu|cuda(:\d+)?")
DEFAULT_OPTIONS = PipelineOptions()


class ModelSettings(BaseSettings):
    """Which model runs where, and how inputs become the encoder's pixels."""

    model_config = SettingsConfigDict(env_prefix="FER_", extra="ignore")

    preset: str = Field(
        DEFAULT_PRESET, description="a bundle of CLIP model, weights, projection and preprocessing"
    )
    clip_model: str | None = Field(None, description="open_clip architecture name, e.g. `ViT-B-32`")
    clip_weights: str | None = Field(
        None,
        description="an open_clip pretrained tag found in the weights folder, a local checkpoint path, "
        "or `random` (seeded random init)",
    )
    projection: str | None = Field(
        None,
        description="a projection file (`.pth` or `.safetensors`), `none` for plain CLIP, or a preset name",
    )
    projection_any_clip: bool = Field(
        False,
        description="use a projection made for another CLIP model (its size must still fit): for a deliberate "
        "experiment; otherwise that is refused",
    )
    preprocess: Preprocess | None = Field(
        None,
        description="`exp-clip` (official evaluation transform) or `clip` (centre crop + CLIP mean/std)",
    )
    device: str = Field(
        "auto",
        description="`auto` (CUDA when available), `cuda` (the first GPU torch sees), `cuda:N` (GPU N), or "
        "`cpu`; CUDA_VISIBLE_DEVICES limits which GPUs torch sees",
    )
    dtype: Dtype = Field(
        "auto",
        description="the CLIP encoders' precision: `auto` (float16 on CUDA, bfloat16 on a CPU that computes "
        "it natively, else float32), `float32`, `float16` (CUDA only), `bfloat16`",
    )
    backend: Backend = Field(
        "torch",
        description="the CLIP encoders' runtime: `torch`, or `openvino` (CPU only, so FER_DEVICE=auto is the "
        "CPU; needs the optional `openvino` extra), whose converted encoders are kept in FER_OPENVINO_CACHE",
    )
    openvino_cache: Path | None = Field(
        None,
        description="where the OpenVINO backend keeps the encoders it converted, one folder per weights whatever "
        "FER_DTYPE, so a restart loads them (default: `openvino` in FER_WEIGHTS_DIR)",
    )
    weights_dir: Path = Field(Path("weights"), description="where downloaded weights live")
    weights_mirror: str | None = Field(
        None,
        description="base URL (`http(s)://` or `file://`) of a copy of the official projection files, "
        "for `fer weights download`",
    )
    face_detector: DetectorName = Field(
        "retinaface",
        description="`retinaface` (RetinaFace-MobileNet0.25: 5 landmarks, aligned crops), `haar` (OpenCV's "
        "frontal-face cascade) or `none` (whole images)",
    )
    face_threshold: float = Field(0.7, ge=0, le=1, description="smallest detector confidence kept as a face")
    align_faces: bool = Field(
        DEFAULT_OPTIONS.align_faces, description="rotate each face so its eyes are level before the crop"
    )
    video_face_side: int = Field(
        DEFAULT_OPTIONS.video_face_side,
        ge=32,
        le=4096,
        description="a video frame's long side when its faces are looked for (frames are decoded at most "
        "960 px on their long side)",
    )
    max_faces: int = Field(
        DEFAULT_OPTIONS.max_faces,
        ge=1,
        le=100,
        description="most faces classified in one image, and in each sampled frame of a video (the largest)",
    )
    face_margin: float = Field(
        DEFAULT_OPTIONS.face_margin, ge=0, le=1, description="margin added around a face box, per side"
    )
    max_image_pixels: int = Field(
        DEFAULT_LIMITS.max_image_pixels, ge=1, description="largest image, in pixels"
    )
    max_video_pixels: int = Field(
        DEFAULT_LIMITS.max_video_pixels, ge=1, description="largest video frame, in pixels"
    )
    max_video_seconds: float = Field(
        DEFAULT_LIMITS.max_video_seconds, gt=0, description="longest video, in seconds"
    )
    max_video_frames: int = Field(
        DEFAULT_LIMITS.max_video_frames, ge=1, description="most frames a video may have"
    )
    max_decode_frames: int = Field(
        DEFAULT_LIMITS.max_decode_frames,
        ge=1,
        description="most frames one request may decode to sample a clip",
    )
    max_decode_megapixels: float = Field(
        DEFAULT_LIMITS.max_decode_megapixels,
        gt=0,
        description="most pixels one request may decode, in millions",
    )
    max_decode_seconds: float = Field(
        DEFAULT_LIMITS.max_decode_seconds, gt=0, description="longest one request's video decoding may take"
    )

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        get_preset(value)
        return value

    @field_validator("device")
    @classmethod
    def _device_choice(cls, value: str) -> str:
        value = value.strip().lower()
        if not DEVICE_CHOICE.fullmatch(value):
            raise ValueError(f"{value!r} is not a device: use auto, cpu, cuda or cuda:N (e.g. cuda:1)")
        return value

    @model_validator(mode="after")
    def _backend_runs_here(self) -> ModelSettings:
        if self.backend == "openvino":
            if self.device.startswith("cuda"):
                raise ValueError(
                    f"FER_BACKEND=openvino runs on the CPU, not FER_DEVICE={self.device}: set FER_DEVICE=cpu, "
                    "or FER_BACKEND=torch for CUDA"
                )
            if not openvino_installed():
                raise ValueError(
                    "FER_BACKEND=openvino needs the optional openvino extra: pip install '.[openvino]'"
                )
        return self

    @property
    def openvino_cache_dir(self) -> Path:
        """Where converted OpenVINO encoders are kept (FER_OPENVINO_CACHE, else in the weights folder,
        which the container image keeps in a volume: a new container loads them too)."""
        return self.openvino_cache or self.weights_dir / "openvino"

    def resolve(self) -> ModelSpec:
        """Every file the model needs; raises MissingWeights (with the command that gets them)."""
        return resolve_model(
            self.preset,
            self.weights_dir,
            clip_model=self.clip_model,
            clip_weights=self.clip_weights,
            projection=self.projection,
            preprocess=self.preprocess,
        )

    def resolve_checked(self) -> ModelSpec:
        """`resolve`, and the projection file read (no CLIP is loaded) to check that it fits the CLIP
        model: its input size and the CLIP model it was made for. Commands call it before any work."""
        from model.projection import check_compatible, load_projection  # torch: not at import

        spec = self.resolve()
        if isinstance(spec.projection, Path):
            embed_dim = open_clip_models().get_model_config(spec.clip_model)["embed_dim"]
            check_compatible(
                load_projection(spec.projection),
                embed_dim,
                spec.projection,
                spec.clip_model,
                any_clip=self.projection_any_clip,
            )
        return spec

    @property
    def media_limits(self) -> MediaLimits:
        return MediaLimits(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MediaLimits)})

    def pipeline_options(self, **overrides) -> PipelineOptions:
        """The options that travel together through the pipeline, as configured (`overrides`: a
        request's or a command's own choices, e.g. detect_faces or frames). With FER_FACE_DETECTOR=none
        nothing detects faces, whatever a request or command asks."""
        options = PipelineOptions(
            detect_faces=self.face_detector != "none",
            max_faces=self.max_faces,
            face_margin=self.face_margin,
            align_faces=self.align_faces,
            video_face_side=self.video_face_side,
            limits=self.media_limits,
        )
        options = options.replace(**overrides)
        return options.replace(detect_faces=False) if self.face_detector == "none" else options


def openvino_installed() -> bool:
    """Whether the optional openvino extra is installed, without importing it."""
    return importlib.util.find_spec("openvino") is not None


def device_for(choice: str, backend: str = "torch") -> str:
    """`auto` -> CUDA when there is one (the CPU for the OpenVINO backend, which runs there only);
    `cuda` or `cuda:N` that torch cannot see is an error, not a silent CPU fallback."""
    import torch

    if backend == "openvino":
        return "cpu" if choice == "auto" else choice  # a CUDA choice was refused with the settings
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"FER_DEVICE={choice} but torch sees no CUDA device; use FER_DEVICE=auto or cpu"
            )
        index = int(choice.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise RuntimeError(
                f"FER_DEVICE={choice} but torch sees {torch.cuda.device_count()} GPU(s), numbered from 0 "
                "(CUDA_VISIBLE_DEVICES renumbers the GPUs it keeps)"
            )
    return choice


def dtype_for(choice: str, device: str) -> torch.dtype:
    """The CLIP encoders' precision. `auto`: float16 on CUDA; on CPU bfloat16 where the CPU computes it
    natively (AVX512-BF16 or AMX), else float32, which emulated bfloat16 would be slower than.
    W and the scores stay float32 whatever the choice."""
    import torch

    on_cuda = device.startswith("cuda")
    if choice == "auto":
        if on_cuda:
            return torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if choice == "float16" and not on_cuda:
        raise RuntimeError("FER_DTYPE=float16 runs on CUDA only; on CPU use bfloat16 or float32")
    return getattr(torch, choice)


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype as FER_DTYPE (and `fer train --dtype`) spell it, e.g. `bfloat16`."""
    return str(dtype).removeprefix("torch.")


def cpu_has_native_bf16() -> bool:
    import torch

    try:  # oneDNN's own check (AVX512-BF16 / AMX); a private op, so absent means "no"
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
