"""The LLM teacher: BLIP-2 with a Flan-T5 language model, of which only the T5 ENCODER runs.

Teacher feature of an image (docs/method.md): the 32 Q-Former query outputs after BLIP-2's
language projection, followed by the instruction's token embeddings (with EOS), go through the T5
encoder; its last hidden state (after the final layer norm) is averaged over all those tokens and
L2-normalised. No text is generated, so the T5 decoder is dropped after loading (about half of
Flan-T5-XXL's weights).

Nothing is downloaded here: the teacher is a local directory or a hub id already in the Hugging Face
cache, loaded with `local_files_only=True`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from model.registry import MissingWeights
from model.settings import dtype_name
from model.train.config import DEFAULT_INSTRUCTION, DEFAULT_TEACHER, INSTRUCTIONS

log = logging.getLogger(__name__)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_instruction(value: str) -> tuple[str, str]:
    """An instruction name (`describer`, `expert`, `actions`, `empty`) or free text -> (name, text).

    Free text (e.g. a random sentence, the paper's other control) gets the name `custom`."""
    if value in INSTRUCTIONS:
        return value, INSTRUCTIONS[value]
    return "custom", value


def resolve_dtype(choice: str, device: str) -> torch.dtype:
    """`auto`: bfloat16 on CUDA (Flan-T5 overflows in float16; LAVIS runs it in bfloat16 too),
    float16 on GPUs without bfloat16, float32 on CPU."""
    if choice != "auto":
        if choice not in DTYPES:
            raise ValueError(f"unknown dtype {choice!r}: use auto, {', '.join(DTYPES)}")
        return DTYPES[choice]
    if torch.device(device).type != "cuda":
        return torch.float32
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16
    log.warning("this GPU has no bfloat16: running the teacher in float16, which Flan-T5 may overflow in")
    return torch.float16


class Teacher:
    """A loaded BLIP-2 Flan-T5 and one instruction: images -> 4096-d (XXL) teacher features."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor,
        instruction: str,
        *,
        source: str,
        instruction_name: str = "custom",
        device: str = "cpu",
    ):
        if model.config.use_decoder_only_language_model:
            raise ValueError(
                f"teacher {source} has a decoder-only language model; Exp-CLIP's teacher is BLIP-2 with Flan-T5"
            )
        self.model = model.eval().requires_grad_(False).to(device)
        self.image_processor = processor.image_processor
        self.source = source
        self.instruction = instruction
        self.instruction_name = instruction_name
        self.device = torch.device(device)
        self.instruction_ids = instruction_token_ids(processor.tokenizer, instruction).to(self.device)

    @classmethod
    def load(
        cls, source: str, instruction: str = DEFAULT_INSTRUCTION, device: str = "cpu", dtype: str = "auto"
    ) -> Teacher:
        """`source`: a local directory (save_pretrained layout) or a hub id already in the HF cache."""
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        name, text = resolve_instruction(instruction)
        torch_dtype = resolve_dtype(dtype, device)
        if not Path(source).is_dir():
            log.info("teacher %s is not a directory: looking for it in the Hugging Face cache", source)
        try:
            processor = Blip2Processor.from_pretrained(source, local_files_only=True)
            model = Blip2ForConditionalGeneration.from_pretrained(
                source, dtype=torch_dtype, local_files_only=True
            )
        except OSError as exc:
            raise MissingWeights(
                f"teacher {source} is neither a local model directory nor in the Hugging Face cache "
                f"(nothing is downloaded at run time): on a machine with internet run "
                f"`hf download {DEFAULT_TEACHER}` (or save_pretrained it to a folder) and pass "
                f"that id or folder with --teacher ({exc.__class__.__name__}: {exc})"
            ) from None
        drop_decoder(model)
        log.info("teacher %s loaded (%s, instruction %s)", source, torch_dtype, name)
        return cls(model, processor, text, source=source, instruction_name=name, device=device)

    @property
    def dim(self) -> int:
        return int(self.model.config.text_config.d_model)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.language_projection.weight.dtype

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return blip_pixel_values(self.image_processor, images)

    @torch.inference_mode()
    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """float32 [N, 3, H, W] -> L2-normalised teacher features [N, dim], float32 on the device."""
        return teacher_features(self.model, pixel_values.to(self.device, self.dtype), self.instruction_ids)

    def metadata(self) -> dict:
        """What a cache records so features made differently are never mixed."""
        return {
            "source": self.source,
            "model_type": self.model.config.model_type,
            "language_model": self.model.config.text_config.model_type,
            "num_query_tokens": int(self.model.config.num_query_tokens),
            "dim": self.dim,
            "dtype": dtype_name(self.dtype),
            "instruction_name": self.instruction_name,
            "instruction": self.instruction,
            "image_processor": self.image_processor.to_dict(),
        }


def blip_pixel_values(image_processor, images: Sequence[Image.Image]) -> torch.Tensor:
    """CPU stage (safe in DataLoader workers): BLIP-2's own preprocessing -> float32 [N, 3, H, W]."""
    return image_processor(list(images), return_tensors="pt")["pixel_values"]


def instruction_token_ids(tokenizer, instruction: str) -> torch.Tensor:
    """[1, L] token ids of the instruction ending in EOS (T5 tokenizers add it; others get it here)."""
    ids = list(tokenizer(instruction, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the teacher's tokenizer has no EOS token")
    if not ids or ids[-1] != eos:
        ids.append(eos)
    return torch.tensor([ids], dtype=torch.long)


def teacher_features(model, pixel_values: torch.Tensor, instruction_ids: torch.Tensor) -> torch.Tensor:
    """The teacher feature: mean over [projected queries ; instruction tokens] of the T5 encoder's
    final hidden state, float32, L2-normalised."""
    queries = model.get_image_features(pixel_values=pixel_values).pooler_output  # [N, Q, d]
    words = model.get_input_embeddings()(instruction_ids).expand(len(queries), -1, -1)
    tokens = torch.cat([queries, words.to(queries.dtype)], dim=1)
    mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
    hidden = model.language_model.get_encoder()(inputs_embeds=tokens, attention_mask=mask).last_hidden_state
    return F.normalize(hidden.float().mean(dim=1), dim=-1)


def drop_decoder(model) -> None:
    """Frees the T5 decoder and LM head, which an encoder-only teacher never calls."""
    language_model = model.language_model
    for name in ("decoder", "lm_head"):
        if hasattr(language_model, name):
            delattr(language_model, name)
