"""Class words and prompt sets: plain data, plus the checks on user-given lists.

Prompts follow the official Exp-CLIP code, whose lists produced the paper's tables: the 11 official
class words get exactly the official lists (`data/official_prompts.json`; for P-4 and P-5 several
classes have their own wording), any other class word gets the uniform templates below. Every class
of a set has the same number of prompts, so logits of a mixed class list still view as [N, C, P].
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from importlib import resources

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
PROMPT_SET_NAMES: tuple[str, ...] = tuple(PROMPT_SETS)

# Limits on user-given text, so that one request cannot ask for thousands of text encodings.
MAX_CLASSES = 64
MAX_PHRASE_CHARS = 200


def _space_class() -> str:
    """What str.split() and str.strip() take for whitespace, as a regular expression's character-class
    body of \\uXXXX ranges (a form every regex dialect of the API's clients reads alike)."""
    codes = [c for c in range(0x3001) if chr(c).isspace()]  # U+3000 is the last
    ranges: list[list[int]] = []
    for code in codes:
        if ranges and code == ranges[-1][1] + 1:
            ranges[-1][1] = code
        else:
            ranges.append([code, code])
    return "".join(f"\\u{a:04x}" + (f"-\\u{b:04x}" if b > a else "") for a, b in ranges)


SPACE_CLASS = _space_class()
# The class lists resolve_classes takes, as the API schema states them: a preset, or two or more
# non-blank items between commas. It also takes a preset in another case or with spaces around it, and
# refuses repeats, likely typos and lists over its limits, which the pattern leaves to the description.
CLASSES_PATTERN = f"^(?:{'|'.join(CLASS_PRESETS)})$|[^,{SPACE_CLASS}][^,]*,[\\s\\S]*[^,{SPACE_CLASS}]"


class LabelError(ValueError):
    """A class list or prompt-set name that cannot be used; the message says what is accepted."""


@cache
def official_prompts() -> dict[str, dict[str, tuple[str, ...]]]:
    """Prompt set -> official class word -> its exact prompts."""
    text = (resources.files("model") / "data" / "official_prompts.json").read_text(encoding="utf-8")
    data = json.loads(text)
    return {name: {word: tuple(prompts) for word, prompts in data[name].items()} for name in PROMPT_SETS}


def class_prompts(word: str, prompt_set: str) -> tuple[str, ...]:
    """The prompts one class is scored with: the official list for an official word, else the
    set's uniform templates filled with the word."""
    official = official_prompts()[prompt_set].get(word)
    return official if official is not None else tuple(t.format(word) for t in PROMPT_SETS[prompt_set])


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
    if len(classes) == 1:
        hint = _close_preset(classes[0])
        raise LabelError(
            f"one class given ({classes[0]!r}): zero-shot classification needs at least two classes; "
            + (
                f"did you mean {hint}?"
                if hint
                else f"give a preset ({', '.join(CLASS_PRESETS)}) or two or more class words"
            )
        )
    if len(classes) > MAX_CLASSES:
        raise LabelError(f"{len(classes)} classes given; at most {MAX_CLASSES} are allowed")
    _refuse_repeats(classes)
    too_long = [c for c in classes if len(c) > MAX_PHRASE_CHARS]
    if too_long:
        raise LabelError(f"class phrases are limited to {MAX_PHRASE_CHARS} characters: {too_long[0][:40]}...")
    return classes


def _refuse_repeats(classes: tuple[str, ...]) -> None:
    """CLIP's tokenizer lowercases, so two spellings of one word give one prompt text: their logits
    would tie and argmax would always pick the first."""
    seen: dict[str, str] = {}
    for word in classes:
        first = seen.get(word.lower())
        seen[word.lower()] = word
        if first is not None:
            spelt = "" if first == word else f" (as {word!r})"
            raise LabelError(f"the class list names {first!r} twice{spelt}: give each class once")


def _close_preset(word: str) -> str | None:
    """A preset the word is probably a typo of: the same up to case and `_` vs `-`, or within two edits."""
    key = word.strip().lower().replace("_", "-").replace(" ", "-")
    distances = {name: _edit_distance(key, name) for name in CLASS_PRESETS}
    best = min(distances, key=distances.get)
    return best if distances[best] <= 2 else None


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions)."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


# Endings that make a known class word into another word on purpose ("surprised", "fears"): not typos.
INFLECTIONS = ("s", "d", "ed", "ful", "ly", "ing", "less")
SHORTEST_CHECKED = 5  # shorter words are one edit from many others ("fear": "dear", "tear")


def check_class_words(classes: Sequence[str], how_to_keep: str) -> None:
    """Refuses a class word that is probably a typo of a known class word (`hapiness`, `sadnes`): not
    one of them, but one edit away (two for words of 8 letters or more). `how_to_keep` tells the user
    how to use the word as written (the API's field, the command's option)."""
    for word in classes:
        known = _typo_of(word)
        if known is not None:
            raise LabelError(f"{word!r} is not a known class word: did you mean {known!r}? ({how_to_keep})")


def _typo_of(word: str) -> str | None:
    key = word.lower()
    if len(key) < SHORTEST_CHECKED or key in CLASS_WORDS:
        return None
    if any(key == known + ending for known in CLASS_WORDS for ending in INFLECTIONS):
        return None
    distances = {known: _edit_distance(key, known) for known in CLASS_WORDS}
    closest = min(distances, key=distances.get)
    return closest if distances[closest] <= (1 if len(key) < 8 else 2) else None


def resolve_prompt_set(name: str | None) -> str:
    """`P-1` .. `P-5` (the default when None); anything else is a LabelError listing the sets."""
    if name is None:
        return DEFAULT_PROMPTS
    if name.strip() not in PROMPT_SETS:
        raise LabelError(f"unknown prompt set {name!r}: choose one of {', '.join(PROMPT_SETS)}")
    return name.strip()


def resolve_prompt_sets(names: Sequence[str]) -> list[str]:
    """Several prompt sets, each once, in the order given; none at all is a LabelError."""
    sets = list(dict.fromkeys(resolve_prompt_set(name) for name in names if name.strip()))
    if not sets:
        raise LabelError(f"no prompt set given: choose one or more of {', '.join(PROMPT_SETS)}")
    return sets


def prompt_table(classes: tuple[str, ...], prompt_set: str) -> dict[str, list[str]]:
    """Class -> the exact prompts it is scored with (what a response or an evaluation reports)."""
    return {c: list(class_prompts(c, prompt_set)) for c in classes}


def prompt_texts(classes: tuple[str, ...], prompt_set: str) -> list[str]:
    """All prompts, class-major: [c0p0, c0p1, ..., c1p0, ...] so logits view as [N, C, P]."""
    return [prompt for c in classes for prompt in class_prompts(c, prompt_set)]


def most_prompt_texts() -> int:
    """The most prompts a class list can have (MAX_CLASSES classes, each with the longest prompt list of
    any set): the most texts a new class list can ask to encode."""
    official = (len(prompts) for words in official_prompts().values() for prompts in words.values())
    return MAX_CLASSES * max(*map(len, PROMPT_SETS.values()), *official)
