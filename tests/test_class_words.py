"""A class word that is probably a typo of a known one (`hapiness`, `sadnes`) is refused with "did you
mean", in a list as for a single word; a deliberate unusual word is still possible (`check_words=false`
in the API, `--no-check-words` on the command line)."""

from __future__ import annotations

import pytest

from cli.main import main
from model.prompts import CLASS_WORDS, LabelError, check_class_words
from tests.support import face_image, png

KEEP = "say so to keep it"


@pytest.mark.parametrize(
    ("word", "known"),
    [
        ("hapiness", "happiness"),
        ("sadnes", "sadness"),
        ("Suprise", "surprise"),
        ("happyness", "happiness"),
        ("disapointment", "disappointment"),
        ("dissapointment", "disappointment"),  # two edits in a long word
    ],
)
def test_a_likely_typo_is_refused_with_the_word_it_resembles(word, known):
    with pytest.raises(LabelError) as refused:
        check_class_words(("calm", word), KEEP)
    assert str(refused.value) == f"{word!r} is not a known class word: did you mean {known!r}? ({KEEP})"


@pytest.mark.parametrize(
    "words",
    [
        CLASS_WORDS,
        ("Happiness", "NEUTRAL"),  # a known word in other case is not a typo
        ("calm", "amused", "furious"),
        ("angry", "happy", "sad", "content", "natural"),  # two edits from a short known word: a word
        ("surprised", "disgusted", "fears", "fearful", "angered"),  # a known word with an ending
        ("dear", "tear"),  # words this short are one edit from many others
        ("a happy face", "pure hapiness"),  # phrases are compared whole
    ],
)
def test_ordinary_and_deliberate_words_pass(words):
    check_class_words(words, KEEP)


def test_the_api_refuses_a_typo_in_a_list_and_keeps_it_when_told(demo_client):
    photo = {"file": ("a.png", png(face_image(0)), "image/png")}
    refused = demo_client.post("/predict", files=photo, data={"classes": "hapiness,sadness"})
    assert refused.status_code == 422
    assert refused.json()["detail"] == (
        "'hapiness' is not a known class word: did you mean 'happiness'? "
        "(send check_words=false to use it as written)"
    )
    kept = demo_client.post(
        "/predict", files=photo, data={"classes": "hapiness,sadness", "check_words": "false"}
    )
    assert kept.status_code == 200 and kept.json()["classes"] == ["hapiness", "sadness"]


def test_the_command_line_refuses_a_typo_and_keeps_it_when_told(model_env, tmp_path, capsys):
    face_image(0).save(tmp_path / "a.png")
    assert main(["predict", "--classes", "sadnes,anger", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert err == (
        "fer: error: 'sadnes' is not a known class word: did you mean 'sadness'? "
        "(pass --no-check-words to use it as written)\n"
    )
    assert main(["predict", "--no-check-words", "--classes", "sadnes,anger", str(tmp_path / "a.png")]) == 0
    assert '"sadnes"' in capsys.readouterr().out
