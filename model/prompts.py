"""Class words and prompt sets: plain data (METHOD.md section 2), plus the checks on user-given lists."""

from __future__ import annotations

# The official label order. Dataset presets take a prefix of it.
CLASS_WORDS: tuple[str, ...] = (
    "happiness",
    "sadness",
    "neutral",
    "anger",
    "surprise",
    "disgust",
    "fear",
    "contempt",
    "anxiety",
    "helplessness",
    "disappointment",
)

BASIC7, BASIC8, ALL11 = CLASS_WORDS[:7], CLASS_WORDS[:8], CLASS_WORDS

CLASS_PRESETS: dict[str, tuple[str, ...]] = {
    "basic7": BASIC7,
    "basic8": BASIC8,
    "all11": ALL11,
    "raf-db": BASIC7,
    "affectnet-7": BASIC7,
    "dfew": BASIC7,
    "ferv39k": BASIC7,
    "afew": BASIC7,
    "affectnet-8": BASIC8,
    "ferplus": BASIC8,
    "mafw": ALL11,
}
DEFAULT_CLASSES = "basic7"

PROMPT_SETS: dict[str, tuple[str, ...]] = {
    "P-1": ("{}.",),
    "P-2": ("an expression of {}.",),
    "P-3": ("a photo of a face with an expression of {}.",),
    "P-4": (
        "an expression of {}.",
        "a photo of a face with an expression of {}.",
        "a photo radiating {} in a person.",
        "a photo showing someone immersed in {}.",
        "a photo capturing {} within an individual.",
    ),
    "P-5": (
        "{}.",
        "an expression of {}.",
        "a photo of a face exuding {}.",
        "a photo radiating {} in a person.",
        "a photo of a person embodying {}.",
        "a good photo capturing someone's {}.",
        "a photo showing someone immersed in {}.",
        "a photo capturing {} within an individual.",
        "a clean photo showcasing a person's {}.",
        "a photo of a face with an expression of {}.",
    ),
}
DEFAULT_PROMPTS = "P-3"

# Limits on user-given text, so that one request cannot ask for thousands of text encodings.
MAX_CLASSES = 64
MAX_PHRASE_CHARS = 200


class LabelError(ValueError):
    """A class list or prompt-set name that cannot be used; the message says what is accepted."""


def resolve_classes(spec: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """A preset name (`basic7`, `ferplus`, ...) or a comma-separated list / sequence of class phrases."""
    if spec is None:
        return CLASS_PRESETS[DEFAULT_CLASSES]
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key in CLASS_PRESETS:
            return CLASS_PRESETS[key]
        spec = spec.split(",")
    classes = tuple(" ".join(c.split()) for c in spec)
    classes = tuple(c for c in classes if c)
    if not classes:
        raise LabelError(
            f"the class list is empty: give a preset ({', '.join(CLASS_PRESETS)}) or class words"
        )
    if len(classes) > MAX_CLASSES:
        raise LabelError(f"{len(classes)} classes given; at most {MAX_CLASSES} are allowed")
    if len(set(classes)) != len(classes):
        raise LabelError("the class list repeats a class")
    too_long = [c for c in classes if len(c) > MAX_PHRASE_CHARS]
    if too_long:
        raise LabelError(f"class phrases are limited to {MAX_PHRASE_CHARS} characters: {too_long[0][:40]}...")
    return classes


def resolve_prompt_set(name: str | None) -> str:
    """Normalises `p3`, `P-3`, `3` to `P-3`; anything else is a LabelError listing the sets."""
    if name is None:
        return DEFAULT_PROMPTS
    key = name.strip().upper().replace("P", "").lstrip("-")
    canonical = f"P-{key}"
    if canonical not in PROMPT_SETS:
        raise LabelError(f"unknown prompt set {name!r}: choose one of {', '.join(PROMPT_SETS)}")
    return canonical


def prompt_texts(classes: tuple[str, ...], prompt_set: str) -> list[str]:
    """All prompts, class-major: [c0p0, c0p1, ..., c1p0, ...] so logits view as [N, C, P]."""
    templates = PROMPT_SETS[prompt_set]
    return [t.format(c) for c in classes for t in templates]
