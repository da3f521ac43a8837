"""The zero-shot FER engine: frozen CLIP encoders + the Exp-CLIP projection W, on one device.

  image -> `prepare` (CPU: RGB, resize, uint8) -> `encode_pixels` (device: [0,1], optional mean/std,
  CLIP image embedding, W; not normalised, so video frames can be pooled before L2)
  texts -> `encode_texts` (CLIP text embedding, W, L2); a class list's prompts -> `class_features`
  (computed once per class list and prompt set, cached on the CPU).
Scoring (softmax over prompt-averaged logits, pooling, ranking) is the pipeline's last stage
(model.pipeline). Every encoder call takes a batch, so callers batch across inputs.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from PIL import Image

from model.clip import LoadedClip, Normaliser, ToPixels, load_clip, pil_transform
from model.projection import check_compatible, load_projection
from model.prompts import prompt_texts
from model.registry import RANDOM, ModelSpec
from model.settings import Backend, ModelSettings, device_for, dtype_for, dtype_name

log = logging.getLogger(__name__)

RANDOM_PROJECTION_DIM = 4096
TEXT_CACHE_BYTES = 256 * 2**20  # user class lists are cached too; bound them by memory, not count
TEXT_BATCH = 256


class Encoders(Protocol):
    """The CLIP encoders as the engine calls them: the torch module itself, or another runtime's towers
    (model.openvino). Both return the embedding before W, not normalised. The torch module's
    `encode_image` takes normalised pixels in the engine's dtype; another runtime's takes the uint8 pixels
    when `normalises` (its graph starts with the normaliser)."""

    normalises: bool

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor: ...


class FerEngine:
    def __init__(
        self,
        clip: LoadedClip,
        projection: torch.Tensor | None,
        preprocess: str,
        device: str = "cpu",
        name: str = "custom",
        dtype: torch.dtype = torch.float32,
        warning: str | None = None,
        encoders: Encoders | None = None,
        backend: str = "torch",
    ):
        self.name = name
        self.backend = backend  # the runtime `encoders` are on (FER_BACKEND), said in the ready line
        self.warning = warning  # e.g. that the weights are random, said beside the name in every answer
        self.device = torch.device(device)
        # The frozen encoders run in `dtype` (weights and activations); their outputs are cast to
        # float32 before W, so the projection, pooling and scores are float32 whatever the dtype.
        self.dtype = dtype
        # `encoders`: another runtime's, which run in `dtype` themselves; by default the torch module.
        self.clip: Encoders = clip.model.to(self.device, dtype) if encoders is None else encoders
        self.encoders_normalise = encoders is not None and encoders.normalises
        self.tokenizer = clip.tokenizer
        self.image_size = clip.preprocess.image_size
        self.prepare_transform = pil_transform(preprocess, clip.preprocess)
        self.to_pixels = ToPixels(self.prepare_transform)  # what the CPU stages and loaders take
        self.normaliser = Normaliser(preprocess, clip.preprocess).to(self.device)
        self.embed_dim = clip.embed_dim
        self.projection = None if projection is None else projection.float().to(self.device)
        self.feature_dim = self.embed_dim if projection is None else projection.shape[0]
        self._text_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._text_cache_bytes = 0
        self._text_lock = threading.Lock()  # guards the cache only, never held while encoding

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_spec(
        cls,
        spec: ModelSpec,
        device: str = "auto",
        dtype: str = "auto",
        *,
        any_clip: bool = False,
        backend: Backend = "torch",
        openvino_cache: Path | None = None,
    ) -> FerEngine:
        """`backend`: the encoders' runtime (FER_BACKEND); `openvino_cache`: where the OpenVINO backend
        keeps its converted encoders (None: converted at every start)."""
        clip = load_clip(spec)
        projection = None
        if spec.projection == RANDOM:
            generator = torch.Generator().manual_seed(0)
            projection = torch.randn(RANDOM_PROJECTION_DIM, clip.embed_dim, generator=generator)
            projection /= clip.embed_dim**0.5
        elif spec.projection is not None:
            loaded = load_projection(spec.projection)
            check_compatible(loaded, clip.embed_dim, spec.projection, spec.clip_model, any_clip=any_clip)
            if loaded.metadata.get("preprocess", spec.preprocess) != spec.preprocess:
                log.warning(
                    "projection %s was trained with %s preprocessing but %s is configured",
                    spec.projection,
                    loaded.metadata["preprocess"],
                    spec.preprocess,
                )
            projection = loaded.weight
        device = device_for(device, backend)
        precision = dtype_for(dtype, device)
        encoders = None
        if backend == "openvino":
            from model.openvino import openvino_clip  # the optional extra: imported only when chosen

            encoders = openvino_clip(
                clip, Normaliser(spec.preprocess, clip.preprocess), precision, openvino_cache
            )
        return cls(
            clip, projection, spec.preprocess, device, spec.name, precision, spec.warning, encoders, backend
        )

    @property
    def dtype_name(self) -> str:
        """The encoders' precision as FER_DTYPE spells it, e.g. `bfloat16`."""
        return dtype_name(self.dtype)

    # ---- image path ---------------------------------------------------------------------------
    def prepare(self, image: Image.Image) -> torch.Tensor:
        """CPU stage, thread-safe: PIL image -> uint8 [3, S, S]."""
        return self.prepare_transform(image)

    def prepare_many(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.to_pixels(images)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, S, S] -> projected features W·x [N, feature_dim], float32 on the device, NOT
        normalised: scoring normalises rows, pooling averages frames first and normalises after."""
        return self.project(self.embed_pixels(pixels))

    @torch.inference_mode()
    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, S, S] -> CLIP's own image embedding (before W, not normalised), float32.
        Training fits W on it; evaluation compares it with the projected feature."""
        if self.device.type == "cuda" and not pixels.is_cuda:
            pixels = pixels.pin_memory()  # uint8 crosses the bus (4x less than float), asynchronously
        pixels = pixels.to(self.device, non_blocking=True)
        if self.encoders_normalise:
            return self.clip.encode_image(pixels).float()
        return self.clip.encode_image(self.normaliser(pixels).to(self.dtype)).float()

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """CLIP embedding -> W (plain CLIP: unchanged). The same map serves images and text."""
        return features if self.projection is None else features @ self.projection.T

    # ---- text path ----------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Strings -> projected, L2-normalised text features [T, feature_dim]."""
        out = []
        for start in range(0, len(texts), TEXT_BATCH):
            tokens = self.tokenizer(list(texts[start : start + TEXT_BATCH])).to(self.device)
            features = self.clip.encode_text(tokens)
            out.append(F.normalize(self.project(features.float()), dim=-1))
        return torch.cat(out)

    def cached_class_features(self, classes: tuple[str, ...], prompt_set: str) -> torch.Tensor | None:
        """`class_features` if it would answer from the cache, else None (nothing is encoded). A hit
        counts as a use: the cache evicts the least recently used list first."""
        with self._text_lock:
            cached = self._text_cache.get((classes, prompt_set))
            if cached is not None:
                self._text_cache.move_to_end((classes, prompt_set))
            return cached

    def class_features(self, classes: tuple[str, ...], prompt_set: str) -> torch.Tensor:
        """[C, P, feature_dim] text features, computed once per (class set, prompt set) and cached.

        Kept on the CPU, so scoring (a small product) runs there: on a GPU, the service's scoring threads
        would otherwise queue behind the encoder's next batch on the device.
        The lock is not held while encoding, so a new class list never stalls requests whose features
        are cached; two requests racing on the same new list may both encode it (same result)."""
        cached = self.cached_class_features(classes, prompt_set)
        if cached is not None:
            return cached
        key = (classes, prompt_set)
        features = self.encode_texts(prompt_texts(classes, prompt_set)).cpu()
        features = features.view(len(classes), -1, self.feature_dim)
        with self._text_lock:
            if key not in self._text_cache:
                self._text_cache[key] = features
                self._text_cache_bytes += features.numel() * features.element_size()
            while self._text_cache_bytes > TEXT_CACHE_BYTES and len(self._text_cache) > 1:
                _, evicted = self._text_cache.popitem(last=False)
                self._text_cache_bytes -= evicted.numel() * evicted.element_size()
        return features


def create_engine(settings: ModelSettings) -> FerEngine:
    """The configured model on the configured device, every file checked before any is loaded."""
    return FerEngine.from_spec(
        settings.resolve(),
        settings.device,
        settings.dtype,
        any_clip=settings.projection_any_clip,
        backend=settings.backend,
        openvino_cache=settings.openvino_cache_dir,
    )
