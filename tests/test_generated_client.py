"""A client generated from the served schema works as written: openapi-python-client (the generator a
stranger reaches for first) turns /openapi.json into a package whose calls upload to every inference
endpoint and get typed answers, under the operations' own names.

openapi-python-client pins httpx and typer below the releases the project locks, so it is not a [dev]
dependency: it runs in an environment of its own through uv (a [dev] dependency), as `uvx` would run it
for a user, or from PATH where it is installed."""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from model.prompts import CLASS_PRESETS
from service.app import create_app
from tests.support import fer_serve, run_bounded, service_settings, serving

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
GENERATOR = "openapi-python-client==0.29.1"  # the release this test was written against
PACKAGE = "fer_client"


def generator() -> list[str]:
    """The generator's command, or a skip saying why there is none."""
    installed = shutil.which("openapi-python-client")
    if installed:
        return [installed]
    uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    if not Path(uv).exists():
        pytest.skip("needs openapi-python-client, or uv to run it: pip install uv (a [dev] dependency)")
    command = [uv, "tool", "run", "--from", GENERATOR, "openapi-python-client"]
    found = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=300)
    if found.returncode != 0:
        pytest.skip(f"uv could not install {GENERATOR} (it needs PyPI once): {found.stderr.strip()[-300:]}")
    return command


@pytest.fixture(scope="module")
def app():
    # The Haar detector finds the sample photo's face without a download, so `faces` has an entry.
    return create_app(service_settings(preset="demo"))


@pytest.fixture(scope="module")
def client_package(app, tmp_path_factory):
    """The package openapi-python-client generates from the app's schema, importable as fer_client."""
    command = generator()
    folder = tmp_path_factory.mktemp("generated")
    schema = folder / "openapi.json"
    schema.write_text(json.dumps(app.openapi()))
    made = subprocess.run(
        [
            *command,
            "generate",
            "--path",
            str(schema),
            "--meta",
            "none",
            "--output-path",
            str(folder / PACKAGE),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    assert "Warning" not in made.stdout + made.stderr, made.stdout + made.stderr  # every part generated
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(folder))
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


def test_the_operations_have_readable_names_and_the_forms_take_files(client_package):
    api = importlib.import_module(f"{PACKAGE}.api")
    names = {
        f"{tag.name}.{operation.name}"
        for tag in (Path(api.__file__).parent).iterdir()
        if tag.is_dir() and not tag.name.startswith("_")
        for operation in tag.glob("[!_]*.py")
    }
    assert names == {
        "inference.predict.py",
        "inference.predict_video.py",
        "inference.retrieve.py",
        "labels.labels.py",
        "operations.livez.py",
        "operations.readyz.py",
        "operations.metrics.py",
    }
    models = importlib.import_module(f"{PACKAGE}.models")
    for form in (models.PredictForm, models.PredictVideoForm, models.RetrieveForm):
        assert form.__annotations__["file"] == "File", form  # a file, not text
    assert models.RetrieveForm.__annotations__["descriptions"] == "str"  # required: no Unset


def test_a_generated_client_uploads_to_every_endpoint_with_typed_answers(app, client_package):
    from fer_client import Client
    from fer_client.api.inference import predict, predict_video, retrieve
    from fer_client.models import (
        ErrorResponse,
        FaceResult,
        FrameResult,
        PredictForm,
        PredictResponse,
        PredictVideoForm,
        PromptSet,
        RankedDescription,
        RetrieveForm,
        RetrieveResponse,
        RetrieveResponseMedia,
        Timing,
        VideoResponse,
    )
    from fer_client.types import File

    def upload(name: str, media_type: str):
        return File(payload=io.BytesIO((SAMPLES / name).read_bytes()), file_name=name, mime_type=media_type)

    async def calls():
        async with serving(app) as http:
            client = Client(base_url=str(http.base_url)).set_async_httpx_client(http)

            photo = await predict.asyncio(
                client=client, body=PredictForm(file=upload("face.jpg", "image/jpeg"))
            )
            assert isinstance(photo, PredictResponse), photo
            assert photo.classes == list(CLASS_PRESETS["basic7"]) and photo.prompts == "P-3"  # the defaults
            assert isinstance(photo.faces[0], FaceResult) and isinstance(photo.timing, Timing)
            assert photo.model_warning == "random weights: answers are meaningless"

            chosen = PredictForm(
                file=upload("face.jpg", "image/jpeg"), classes="calm,amused,furious", prompts=PromptSet.P_5
            )
            photo = await predict.asyncio(client=client, body=chosen)
            assert photo.classes == ["calm", "amused", "furious"] and photo.prompts == "P-5"

            form = PredictVideoForm(file=upload("clip.mp4", "video/mp4"), frames=4, per_frame=True)
            clip = await predict_video.asyncio(client=client, body=form)
            assert isinstance(clip, VideoResponse), clip
            assert clip.frames_sampled == 4 and all(isinstance(f, FrameResult) for f in clip.timeline)

            texts = ["raises the eyebrows", "smiles broadly"]
            form = RetrieveForm(file=upload("clip.mp4", "video/mp4"), descriptions=json.dumps(texts), top_k=1)
            ranked = await retrieve.asyncio(client=client, body=form)
            assert isinstance(ranked, RetrieveResponse), ranked
            assert ranked.media == RetrieveResponseMedia.VIDEO
            assert isinstance(ranked.ranking[0], RankedDescription) and ranked.ranking[0].text in texts

            refused = await predict.asyncio(
                client=client, body=PredictForm(file=upload("face.jpg", "image/jpeg"), classes="calm")
            )
            assert isinstance(refused, ErrorResponse) and refused.error == "invalid_field"

    run_bounded(calls(), 120)


def docs_example() -> str:
    """docs/api.md's generated-client example: the second code block of its section."""
    section = (ROOT / "docs" / "api.md").read_text().split("## From a generated client", 1)[1]
    runs = re.findall(r"((?:^    .*\n|^\n)+)", section.split("\n## ", 1)[0], flags=re.M)
    blocks = [run for run in runs if run.strip()]
    return textwrap.dedent(blocks[1])


@pytest.mark.slow  # a `fer serve`
def test_the_docs_example_runs_on_the_generated_client(client_package, tmp_path):
    (tmp_path / "samples").symlink_to(SAMPLES)
    with fer_serve({"FER_PRESET": "demo", "FER_FACE_DETECTOR": "haar"}) as (http, _):
        code = docs_example().replace("http://127.0.0.1:8000", str(http.base_url).rstrip("/"))
        folder = Path(client_package.__file__).parents[1]
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(folder)},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    box = r"\[\d+, \d+, \d+, \d+\]"
    assert re.fullmatch(rf"(calm|amused|furious) \[{box}(, {box})*\]\n", done.stdout), done.stdout
