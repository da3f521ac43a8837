"""The README's commands run as written: the two fresh-machine commands are CI's, and every example that
can run offline (the demo preset) is run here against a real `fer serve` and the real `fer`."""

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
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from skimage import data as skimage_data

from tests.conftest import make_video

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
    for target in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (ROOT / target).is_file(), target


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The files the examples name, and `.venv/bin` pointing at this interpreter's."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / ".venv").mkdir()
    (folder / ".venv" / "bin").symlink_to(Path(sys.executable).parent)
    Image.fromarray(skimage_data.astronaut()).save(folder / "face.jpg")
    Image.fromarray(skimage_data.astronaut()).rotate(10).save(folder / "face2.jpg")
    make_video(folder / "clip.mp4", 40)
    (folder / "descriptions.txt").write_text("raises the eyebrows\nsmiles broadly\nfrowns\n")
    (folder / "labels.csv").write_text("file,label\nface.jpg,happiness\nface2.jpg,sadness\n")
    return folder


@pytest.fixture(scope="module")
def served(workdir):
    """The first command's server, as written (on another port when 8000 is taken)."""
    port = 8000
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    command = SERVE.split(" && ")[-1] + ("" if port == 8000 else f" --port {port}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FER_")}
    server = subprocess.Popen(command, shell=True, cwd=workdir, env=env, start_new_session=True)
    try:
        for _ in range(900):
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            assert server.poll() is None, "the README's serve command exited"
            time.sleep(0.1)
        else:
            raise AssertionError("the README's serve command was not ready within 90 s")
        yield port
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)


@pytest.mark.slow  # a server and a process per example: CI's slow tier
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("curl ")])
def test_the_curl_examples(served, workdir, command):
    command = command.replace("127.0.0.1:8000", f"127.0.0.1:{served}")
    done = subprocess.run(shlex.split(command), cwd=workdir, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert "error" not in body, body


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
