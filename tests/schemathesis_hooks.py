"""Schemathesis hooks for the fuzzing run in tests/test_openapi.py (SCHEMATHESIS_HOOKS names this
module).

A request the schema allows may still be refused for what no JSON schema can say, and schemathesis
reports that refusal as "schema-valid request rejected". This hook excuses exactly those refusals, each
checked against the request that was sent; every other refusal of a schema-valid request stays a
failure. (The cases are not edited instead: schemathesis judges an edited body that holds a file
schema-violating.)"""

from __future__ import annotations

import json
import re

import schemathesis

from model.prompts import CLASSES_PATTERN, LabelError, check_class_words, resolve_classes

# `format: binary` says bytes, not bytes that decode to media of the endpoint's kind.
CONTENT_REFUSALS = {"undecodable_media", "wrong_endpoint"}


@schemathesis.hook
def filter_failure(context, failure, case: schemathesis.Case, response: schemathesis.Response) -> bool:
    """False drops the failure: a schema-valid request refused by a rule the schema cannot state, or a
    request schemathesis meant to break the `classes` pattern with that still matches it."""
    if not isinstance(case.body, dict):
        return True
    if failure.code == "ST201":
        return not _still_matches_classes_pattern(failure.message, case.body.get("classes"))
    if failure.code != "ST202":
        return True
    try:
        error = response.json()
    except ValueError:
        return True
    if response.status_code == 400 and error.get("error") in CONTENT_REFUSALS:
        return False
    if response.status_code != 422 or error.get("error") != "invalid_field":
        return True
    detail = error.get("detail", "")
    if detail.startswith("descriptions:"):
        return _follows_content_schema(case.body.get("descriptions"))
    if isinstance(case.body.get("classes"), str):
        return not _repeat_or_typo(case.body["classes"])
    return True


def _still_matches_classes_pattern(message: str, classes: object) -> bool:
    """Whether the request's only reason to be refused was to be `classes` breaking its pattern, and the
    text sent matches it after all: schemathesis's mutation of a pattern (e.g. a character appended) can
    leave a text the pattern still accepts, which the service is right to accept."""
    one_mutation = "\n  - " not in message  # several are listed one a line: another may be a real one
    if not one_mutation or "violates `pattern` at " not in message or "/properties/classes (" not in message:
        return False
    return isinstance(classes, str) and re.search(CLASSES_PATTERN, classes) is not None


def _follows_content_schema(text: object) -> bool:
    """Whether `descriptions` is the JSON its contentSchema describes: a non-empty array of non-blank
    strings. Schemathesis draws a contentMediaType: application/json text from any JSON value."""
    try:
        texts = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return False
    return isinstance(texts, list) and bool(texts) and all(isinstance(t, str) and t.strip() for t in texts)


def _repeat_or_typo(classes: str) -> bool:
    """A class list that names a word twice (in any case) or holds a likely typo of a known word: what
    the schema's pattern for `classes` cannot say."""
    try:
        check_class_words(resolve_classes(classes), "")
    except LabelError as refused:
        return "twice" in str(refused) or "did you mean" in str(refused)
    return False
