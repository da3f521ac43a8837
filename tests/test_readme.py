"""The README's commands run as written: the two fresh-machine commands are CI's, and every example that
can run offline (the demo preset) is run here against a real `fer serve` and the real `fer`, on the
sample files the repository ships (samples/)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support import wait_until

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
COMMANDS = [
    line[4:] for line in README.splitlines() if line.startswith("    ") and not line.startswith("     ")
]
SERVE = "python3 -m venv .venv && .venv/bin/pip install -c docker/requirements.lock -e . && FER_PRESET=demo .venv/bin/fer serve"
TEST = "python3 -m venv .venv && .venv/bin/pip install -c docker/requirements.lock -e '.[dev]' && .venv/bin/python -m pytest"


def test_the_fresh_machine_commands_come_first_and_ci_runs_the_test_one():
    assert COMMANDS[:2] == [SERVE, TEST]
    assert TEST in (ROOT / ".ci" / "run").read_text()
    assert len(README.splitlines()) <= 200  # a product page; details live in docs/


def test_every_linked_doc_exists():
    for target in re.findall(r"\]\(((?:docs|samples)/[^)#]+)", README):
        assert (ROOT / target).is_file(), target


def test_the_examples_use_the_sample_files_the_repository_ships():
    named = {m for c in COMMANDS for m in re.findall(r"(samples/[\w./-]+)", c)}
    assert {"samples/face.jpg", "samples/clip.mp4", "samples/labels.csv"} <= named
    for path in named:
        assert (ROOT / path).is_file(), f"the README names {path}, which the repository does not ship"
    for row in (ROOT / "samples" / "labels.csv").read_text().splitlines()[1:]:
        assert (ROOT / "samples" / row.split(",")[0]).is_file(), row
    assert "public domain" in (ROOT / "samples" / "README.md").read_text()  # the licence is stated


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A checkout's view for the examples: the shipped samples/, and `.venv/bin` pointing at this
    interpreter's."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / ".venv").mkdir()
    (folder / ".venv" / "bin").symlink_to(Path(sys.executable).parent)
    (folder / "samples").symlink_to(ROOT / "samples")
    return folder


@pytest.fixture(scope="module")
def served(workdir):
    """The first command's server, as written (on another port when 8000 is taken), its log in
    serve.log."""
    port = 8000
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    command = SERVE.split(" && ")[-1] + ("" if port == 8000 else f" --port {port}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FER_")}
    log = (workdir / "serve.log").open("w")
    server = subprocess.Popen(
        command, shell=True, cwd=workdir, env=env, start_new_session=True, stderr=log, stdout=log
    )
    try:

        def ready() -> bool:
            assert server.poll() is None, "the README's serve command exited"
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
            return False

        wait_until(ready, "the README's serve command answering /readyz", seconds=90, every=0.1)
        yield port
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)
        log.close()


@pytest.mark.slow  # a server and a process per example: CI's slow tier
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("curl ")])
def test_the_curl_examples(served, workdir, command):
    command = command.replace("127.0.0.1:8000", f"127.0.0.1:{served}")
    done = subprocess.run(shlex.split(command), cwd=workdir, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert "error" not in body, body


def python_example() -> str:
    """docs/api.md's "From Python" code block (its indented lines)."""
    section = (ROOT / "docs" / "api.md").read_text().split("## From Python", 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("    "))
    block = []
    for line in lines[start:]:
        if line.strip() and not line.startswith("    "):
            break
        block.append(line[4:])
    return "\n".join(block)


@pytest.mark.slow
def test_the_python_example_runs(served, workdir):
    code = python_example().replace("127.0.0.1:8000", f"127.0.0.1:{served}")
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    *faces, best = done.stdout.splitlines()
    assert faces and all(
        re.fullmatch(r"\[\d+, \d+, \d+, \d+\] (calm|amused|furious) [\d.]+", f) for f in faces
    )
    assert best in ("raises the eyebrows", "smiles broadly")


@pytest.mark.slow
def test_the_serve_command_logs_its_start_and_each_refusal_at_its_default_level(served, workdir):
    refused = httpx.post(
        f"http://127.0.0.1:{served}/predict",
        files={"file": ("notes.txt", b"not a photo", "text/plain")},
        headers={"X-Request-ID": "readme-1"},
    )
    assert refused.status_code == 415
    log = workdir / "serve.log"
    wait_until(lambda: "[readme-1]" in log.read_text(), "the access line that follows the answer", seconds=5)
    text = log.read_text()
    assert re.search(
        r"^INFO ready: model demo on cpu .* loaded in [\d.]+ s; answering at http://", text, re.M
    )
    assert "random weights: answers are meaningless" in text
    assert "INFO request readme-1: 415 unsupported_media_type: text/plain is not accepted here" in text
    assert '"POST /predict HTTP/1.1" 415 [readme-1]' in text
    assert "No pretrained weights" not in text


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("FER_PRESET=demo .venv/bin/fer ")])
def test_the_command_line_examples(workdir, command):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FER_")}
    done = subprocess.run(
        command, shell=True, cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    if " eval " not in command:
        assert all("error" not in json.loads(line) for line in done.stdout.splitlines())
