"""The OpenAPI schema says what the service does, for the tools that read it: client generators (the
generated client itself: tests/test_generated_client.py), Swagger UI's "Try it out" (tests/test_web.py
runs it) and fuzzers, here schemathesis against the demo preset (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from model.prompts import CLASSES_PATTERN, DEFAULT_CLASSES, DEFAULT_PROMPTS
from service.app import create_app
from tests.support import fer_serve, service_settings

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
OPERATIONS = {
    ("get", "/livez"): "livez",
    ("get", "/readyz"): "readyz",
    ("get", "/labels"): "labels",
    ("get", "/metrics"): "metrics",
    ("post", "/predict"): "predict",
    ("post", "/predict-video"): "predict_video",
    ("post", "/retrieve"): "retrieve",
}


@pytest.fixture(scope="module")
def schema() -> dict:
    return create_app(
        service_settings(preset="demo", max_frames=8, max_descriptions=40, max_description_chars=90)
    ).openapi()


def form(schema: dict, operation: str) -> dict:
    method, path = next(key for key, name in OPERATIONS.items() if name == operation)
    content = schema["paths"][path][method]["requestBody"]["content"]["multipart/form-data"]
    return schema["components"]["schemas"][content["schema"]["$ref"].rsplit("/", 1)[1]]


def test_every_operation_has_a_readable_id_a_tag_a_summary_and_a_description(schema):
    found = {(m, p): op["operationId"] for p, ops in schema["paths"].items() for m, op in ops.items()}
    assert found == OPERATIONS
    tags = {tag["name"] for tag in schema["tags"]}
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            assert len(operation["tags"]) == 1 and operation["tags"][0] in tags, path
            assert operation["summary"] and operation["description"], path
    forms = {name for name in schema["components"]["schemas"] if name.endswith("Form")}
    assert forms == {"PredictForm", "PredictVideoForm", "RetrieveForm"}
    assert not [name for name in schema["components"]["schemas"] if name.startswith("Body_")]


@pytest.mark.parametrize("path", ["/predict-video", "/retrieve"])
def test_a_clip_endpoint_says_its_answer_is_the_main_tracks(schema, path):
    """One track per person: a description of one pooled clip feature would mislead a client's author."""
    description = schema["paths"][path]["post"]["description"]
    assert "one track per person" in description.lower() and "main track" in description


@pytest.mark.parametrize("operation", ["predict", "predict_video", "retrieve"])
def test_a_form_says_what_the_service_takes(schema, operation):
    fields = form(schema, operation)
    upload = fields["properties"]["file"]
    assert upload["format"] == "binary" and upload["minLength"] == 1  # a file to generators, never empty
    for name, field in fields["properties"].items():  # a form part cannot be null
        assert "anyOf" not in field and field.get("type") != "null", name
    if operation == "retrieve":
        assert set(fields["required"]) == {"file", "descriptions"}
        assert json.loads(fields["properties"]["descriptions"]["example"])  # Swagger UI's prefill
        # this app's FER_MAX_DESCRIPTIONS and FER_MAX_DESCRIPTION_CHARS, which no JSON schema of a text states
        assert (
            "1 to 40 of them, each at most 90 characters"
            in fields["properties"]["descriptions"]["description"]
        )
    else:
        assert fields["required"] == ["file"]
        classes = fields["properties"]["classes"]
        assert classes["default"] == DEFAULT_CLASSES and classes["pattern"] == CLASSES_PATTERN
        assert fields["properties"]["prompts"]["default"] == DEFAULT_PROMPTS
    if "frames" in fields["properties"]:
        assert fields["properties"]["frames"]["maximum"] == 8  # this app's FER_MAX_FRAMES


def test_the_descriptions_part_may_come_as_a_json_file(demo_client):
    """Swagger UI sends it so, as the schema's encoding (application/json) asks; `curl -F
    descriptions=@texts.json` too."""
    texts = json.dumps(["raises the eyebrows", "smiles broadly"]).encode()
    files = [
        ("file", ("clip.mp4", (SAMPLES / "clip.mp4").read_bytes(), "video/mp4")),
        ("descriptions", ("blob", texts, "application/json")),
    ]
    answer = demo_client.post("/retrieve", files=files)
    assert answer.status_code == 200, answer.text
    assert {r["text"] for r in answer.json()["ranking"]} == {"raises the eyebrows", "smiles broadly"}
    files[1] = ("descriptions", ("blob", b"\xff\xfe", "application/json"))
    answer = demo_client.post("/retrieve", files=files)
    assert answer.status_code == 422
    assert answer.json()["detail"] == "descriptions: give UTF-8 text"


# ---- fuzzing ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_schemathesis_finds_no_valid_request_refused_and_no_server_error(tmp_path):
    """`schemathesis run --checks all` against `fer serve` on the demo preset: every phase (the schema's
    examples, its boundaries, random requests), bounded by examples per operation. tests/
    schemathesis_hooks.py excuses only the refusals no JSON schema can rule out (media that do not
    decode, a class list with a repeat or a typo, a descriptions text that is not a JSON array)."""
    command = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    if not Path(command).exists():
        pytest.skip("needs schemathesis, a [dev] dependency: pip install -e '.[dev]'")
    env = {"FER_PRESET": "demo", "FER_DEVICE": "cpu", "FER_FACE_DETECTOR": "haar"}
    with fer_serve(env) as (http, _):
        run = subprocess.run(
            [
                command,
                "run",
                str(http.base_url.join("/openapi.json")),
                "--checks=all",
                "--max-examples=100",
                "--workers=1",
                "--generation-database=none",
                "--continue-on-failure",
                "--no-color",
            ],
            cwd=tmp_path,  # its own files (.schemathesis/) stay out of the repository
            env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=480,
        )
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-8000:]
    assert "Operations:       7 selected / 7 total" in report, report[-3000:]


def test_the_fuzzing_hook_excuses_a_pattern_mutation_only_where_classes_still_match():
    """Schemathesis breaks `classes` by mutating a valid list (appending a character, ...), which may
    leave a list the pattern still accepts; the hook drops that failure, and only that one."""
    hooks = pytest.importorskip("tests.schemathesis_hooks", reason="needs schemathesis, a [dev] dependency")
    reason = "Invalid data should have been rejected\nExpected: 400, 422\nInvalid component: in body - "

    def kept(message: str, classes: str) -> bool:
        failure = SimpleNamespace(code="ST201", message=reason + message)
        return hooks.filter_failure(None, failure, SimpleNamespace(body={"classes": classes}), None)

    still_valid = "Zï*è,x{a\U00107f7a£YË*"
    mutation = (
        f'violates `pattern` at /$ref/schema000001/properties/classes (was "a,b", became "{still_valid}")'
    )
    assert kept(mutation, still_valid) is False
    assert kept(mutation, "one class only") is True  # it did break the pattern: the service must refuse
    other_field = 'violates `pattern` at /$ref/schema000001/properties/prompts (was "P-1", became "x")'
    assert kept(other_field, still_valid) is True
    several = f"\n  - {mutation}\n  - violates `type` at /$ref/schema000001/properties/per_frame"
    assert kept(several, still_valid) is True
