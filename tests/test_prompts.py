"""The prompt lists are the official code's (the lists behind the paper's Table A), and class lists a
user gets wrong are refused with a sentence that says what to do."""

from __future__ import annotations

import json
import re

import pytest

from model.prompts import (
    CLASS_WORDS,
    CLASSES_PATTERN,
    PROMPT_SETS,
    SPACE_CLASS,
    LabelError,
    class_prompts,
    prompt_table,
    prompt_texts,
    resolve_classes,
)


def test_every_official_list_equals_the_official_code(official_prompts_file):
    if official_prompts_file is None:
        pytest.skip(
            "needs the official Exp-CLIP code's prompt lists: the team's development files, kept outside "
            "the repository at ../shared/docs, are not on this machine"
        )
    official = json.loads(official_prompts_file.read_text())
    assert list(official["class_words"]) == list(CLASS_WORDS)
    for prompt_set in PROMPT_SETS:
        for word in CLASS_WORDS:
            assert list(class_prompts(word, prompt_set)) == official[prompt_set][word], (prompt_set, word)


def test_distinctive_official_prompts_are_pinned():
    """Prompts where the official code departs from the appendix's uniform templates."""
    assert class_prompts("sadness", "P-4")[1] == "a cropped photo emphasizing a face expressing sadness."
    assert class_prompts("neutral", "P-5")[7] == "a good photo capturing someone's neutral state."
    assert class_prompts("anger", "P-5")[9] == "a clean photo showcasing a person's angry expression."
    assert class_prompts("neutral", "P-5")[5] == "a photo of a face displaying neutral."
    assert class_prompts("happiness", "P-5")[5] == "a photo of a face exuding happiness."
    assert class_prompts("fear", "P-3") == ("a photo of a face with an expression of fear.",)
    assert class_prompts("contempt", "P-1") == ("contempt.",)


def test_other_words_get_the_uniform_templates_and_every_class_the_same_count():
    assert class_prompts("calm", "P-5") == tuple(t.format("calm") for t in PROMPT_SETS["P-5"])
    assert class_prompts("Sadness", "P-4")[1] == "a photo of a face with an expression of Sadness."
    for prompt_set, templates in PROMPT_SETS.items():
        for word in (*CLASS_WORDS, "calm"):
            assert len(class_prompts(word, prompt_set)) == len(templates)
    classes = ("sadness", "calm")
    texts = prompt_texts(classes, "P-4")
    assert texts == [*class_prompts("sadness", "P-4"), *class_prompts("calm", "P-4")]  # class-major
    assert prompt_table(classes, "P-4") == {c: list(class_prompts(c, "P-4")) for c in classes}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("raf_db", "did you mean raf-db?"),
        ("RAF_DB", "did you mean raf-db?"),
        ("ferplu", "did you mean ferplus?"),
        ("affectnet7", "did you mean affectnet-7?"),
        ("happiness", "at least two classes; give a preset"),
        ("calm,", "at least two classes"),
        ("", "the class list is empty"),
    ],
)
def test_a_class_list_of_fewer_than_two_classes_is_refused(spec, message):
    with pytest.raises(LabelError, match=message):
        resolve_classes(spec)


@pytest.mark.parametrize("spec", ["happiness,Happiness,sadness", "calm, Very  Calm,very calm", "calm,calm"])
def test_a_class_list_that_repeats_a_class_up_to_case_is_refused(spec):
    # CLIP's tokenizer lowercases: the two spellings' prompts are one text, their logits always tie.
    with pytest.raises(LabelError, match=r"^the class list names .+ twice[^;]*$"):
        resolve_classes(spec)


def test_a_repeated_class_is_one_422_and_one_cli_line(engine, capsys):
    from fastapi.testclient import TestClient

    from cli.main import main
    from service.app import create_app
    from service.settings import ServiceSettings
    from tests.support import face_image, png, wait_ready

    settings = ServiceSettings(device="cpu", face_detector="none")
    with TestClient(create_app(settings, engine_factory=lambda s: engine)) as client:
        wait_ready(client)
        files = {"file": ("a.png", png(face_image(0)), "image/png")}
        answer = client.post("/predict", files=files, data={"classes": "happiness,Happiness,sadness"})
    assert answer.status_code == 422 and answer.json()["error"] == "invalid_field"
    assert "happiness" in answer.json()["detail"]
    assert main(["predict", "a.png", "--classes", "Calm,calm,tense"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fer: error: the class list names") and err.count("\n") == 1


@pytest.mark.parametrize(
    "spec",
    [
        "basic7",
        "mafw",
        "calm,amused",
        "a,b,c",
        " ,calm,,amused, ",  # blank items are dropped
        "0\u00a0x,y",  # a no-break space inside a word
        "x,\u3000y",
        "x,\ufeffy",  # U+FEFF is not whitespace to str.strip()
        "calm, \nangry",
        # refused
        "",
        "calm",
        "calm,",
        ",calm, ,",
        "calm,\u00a0",  # str.split() takes U+00A0 for a space...
        "calm,\x1f",  # ...and U+001F, which JSON Schema's \s does not
        "calm,\u2028\u3000",
        "raf_db",
    ],
)
def test_the_schema_pattern_of_a_class_list_says_what_resolve_classes_takes(spec):
    """The pattern the API schema gives `classes` (what fuzzers and validators read) against the rule
    itself, for lists without repeats or typos (which no pattern states)."""
    try:
        resolve_classes(spec)
        taken = True
    except LabelError:
        taken = False
    assert (re.search(CLASSES_PATTERN, spec) is not None) == taken


def test_the_space_class_is_what_str_strip_removes():
    not_blank = f"[^{SPACE_CLASS}]"  # a character a trimmed text keeps, as CLASSES_PATTERN's items need
    assert all((re.search(not_blank, chr(c)) is None) == (chr(c).strip() == "") for c in range(0x10000))
