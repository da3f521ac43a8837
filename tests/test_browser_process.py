"""tests/test_web.py (the page in Chromium) in a pytest process of its own, with this run's marker
expression (its tests are of the fast tier, as this one is): why, tests/conftest.py's
`pytest_ignore_collect` says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BROWSER_TESTS, OWN_PROCESS

ROOT = Path(__file__).resolve().parents[1]
NO_TESTS_COLLECTED = 5  # pytest's exit code when the marker expression selects none of them


def test_the_browser_tests_pass_in_their_own_process(request):
    command = [
        sys.executable,
        "-m",
        "pytest",
        f"tests/{BROWSER_TESTS}",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rs",
    ]
    if markers := request.config.getoption("markexpr"):
        command += ["-m", markers]
    done = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, OWN_PROCESS: "1"},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    output = done.stdout + done.stderr
    if done.returncode == NO_TESTS_COLLECTED:
        pytest.skip(f"no browser test has the markers {markers!r}")
    print(output[-3000:])  # the child's summary, skips included, shown with -s or on failure
    assert done.returncode == 0, output[-20000:]
