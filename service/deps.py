"""Request dependencies: the runtime, and the form fields every inference endpoint shares, parsed and
checked once (a bad value is a 422 naming the field and what is accepted)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

from fastapi import Depends, Form, Request
from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError

from model.prompts import (
    CLASS_PRESETS,
    CLASSES_PATTERN,
    DEFAULT_CLASSES,
    DEFAULT_PROMPTS,
    MAX_CLASSES,
    MAX_PHRASE_CHARS,
    PROMPT_SET_NAMES,
    check_class_words,
    resolve_classes,
    resolve_prompt_set,
)
from service.errors import InvalidField
from service.runtime import Runtime


def _true_or_false(value: object) -> object:
    """A form's boolean: `true` or `false`, in any case (a generated Python client sends `True`), as the
    schema's boolean says; pydantic alone also takes 1/0, yes/no, on/off, t/f and y/n."""
    if isinstance(value, str):
        if value.lower() not in ("true", "false"):
            raise PydanticCustomError("bool_parsing", "give true or false")
        return value.lower() == "true"
    return value


Flag = Annotated[bool, BeforeValidator(_true_or_false)]

# The schema lists the allowed names, once: a generated client has one PromptSet type for every endpoint.
PromptSet = StrEnum("PromptSet", {name: name for name in PROMPT_SET_NAMES})


async def get_runtime(request: Request) -> Runtime:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a thread hop on every request
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


@dataclass(frozen=True)
class Labels:
    classes: tuple[str, ...]
    prompt_set: str


async def get_labels(
    request: Request,
    classes: Annotated[
        str,
        Form(
            description=f"a class preset ({', '.join(CLASS_PRESETS)}) or comma-separated class words "
            f"(2 to {MAX_CLASSES}, each once, up to {MAX_PHRASE_CHARS} characters)",
            examples=[DEFAULT_CLASSES, "calm,amused,furious"],
            json_schema_extra={"pattern": CLASSES_PATTERN},
        ),
    ] = DEFAULT_CLASSES,
    prompts: Annotated[PromptSet, Form(description="prompt set")] = PromptSet[DEFAULT_PROMPTS],
    check_words: Annotated[
        Flag,
        Form(
            description="refuse a class word that looks like a typo of a known one (e.g. `hapiness`); "
            "false uses the words as written"
        ),
    ] = True,
) -> Labels:
    # The form parser turns an empty field into "absent"; an empty field a client did send is a mistake,
    # not a request for the default.
    form = await request.form()
    for name in ("classes", "prompts"):
        if name in form and not str(form[name]).strip():
            raise InvalidField(f"{name}: the field is empty; leave it out for the default")
    words = resolve_classes(classes)
    if check_words:
        check_class_words(words, "send check_words=false to use it as written")
    return Labels(words, resolve_prompt_set(prompts))


LabelsDep = Annotated[Labels, Depends(get_labels)]
DetectField = Annotated[
    Flag, Form(description="classify each detected face (a video: each person's faces, as a track)")
]
FramesField = Annotated[int, Form(ge=1, description="frames sampled (16 equal segments' middle frames)")]
