"""The dependency lock (docker/requirements.lock, written by tools/lock.sh) against pyproject.toml, the
bounds on the packages whose internals the code uses, and the start-up check of uvicorn's release."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support import free_port

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "docker" / "requirements.lock"
CONSTRAINTS = ROOT / "docker" / "constraints.txt"
# Packages whose private parts the code uses: service/connections.py subclasses uvicorn's httptools
# protocol, service/ray_serve.py reads prometheus_client's metric fields and Serve's late-bound ingress.
INTERNALS_USED = ("uvicorn", "prometheus-client", "ray")


def requirement_lines(text: str) -> list[Requirement]:
    """The requirements of a requirements-format file (comments, `# via` notes and options dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def project_requirements(pyproject: dict) -> list[Requirement]:
    """Every requirement of the project and of each of its extras."""
    project = pyproject["project"]
    extras = project.get("optional-dependencies", {}).values()
    return [Requirement(r) for r in project["dependencies"] + [r for extra in extras for r in extra]]


def lock_drift(requirements: list[Requirement], lock: list[Requirement]) -> list[str]:
    """What the lock gets wrong for these requirements: a package missing, or a pin outside their bounds.
    A package the lock forks by platform or Python has several pins; each must be within bounds."""
    pins: dict[str, list[str]] = {}
    for locked in lock:
        (specifier,) = locked.specifier  # the lock pins, one `==` each
        assert specifier.operator == "==", f"{locked} is not a pin"
        pins.setdefault(canonicalize_name(locked.name), []).append(specifier.version)
    problems = []
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        if name not in pins:
            problems.append(f"{requirement.name} is not in the lock")
        for version in pins.get(name, []):
            if not requirement.specifier.contains(version, prereleases=True):
                problems.append(f"{requirement.name}=={version} is outside {requirement.specifier}")
    return problems


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def lock() -> list[Requirement]:
    return requirement_lines(LOCK.read_text())


def test_the_lock_pins_every_package_the_project_names_within_its_bounds(pyproject, lock):
    """Fails when a dependency was added or its bounds changed without running tools/lock.sh."""
    requirements = project_requirements(pyproject) + requirement_lines(CONSTRAINTS.read_text())
    assert lock_drift(requirements, lock) == []


def test_the_drift_check_finds_a_missing_package_and_a_pin_out_of_bounds(pyproject, lock):
    requirements = project_requirements(pyproject)
    assert requirements, "pyproject.toml names no dependency"
    uvicorn = next(r for r in lock if r.name == "uvicorn")
    (pin,) = uvicorn.specifier
    added = [*requirements, Requirement("openapi-python-client>=0.20"), Requirement(f"uvicorn>{pin.version}")]
    assert lock_drift(added, lock) == [
        "openapi-python-client is not in the lock",
        f"uvicorn=={pin.version} is outside >{pin.version}",
    ]


def test_the_lock_is_written_by_the_documented_command_for_every_extra():
    header = LOCK.read_text().splitlines()[:2]
    assert header[1].strip("# ") == "tools/lock.sh"
    script = (ROOT / "tools" / "lock.sh").read_text()
    # Every extra, present and future, and every platform the images and CI use.
    assert "--all-extras" in script and "--universal" in script
    assert "--constraint docker/constraints.txt" in script


def test_ci_and_the_image_install_through_the_lock():
    install = (ROOT / "docker" / "install.sh").read_text()
    assert "--constraint docker/requirements.lock" in install
    ci = (ROOT / ".ci" / "run").read_text()
    pip_installs = [line for line in ci.splitlines() if "pip install" in line]
    assert pip_installs and all("-c docker/requirements.lock" in line for line in pip_installs)


@pytest.mark.parametrize("name", INTERNALS_USED)
def test_packages_whose_internals_the_code_uses_have_an_upper_bound(pyproject, name):
    requirement = next(r for r in project_requirements(pyproject) if canonicalize_name(r.name) == name)
    assert any(s.operator in ("<", "<=", "==", "~=") for s in requirement.specifier), requirement


# ---- uvicorn's release, checked at start-up ----------------------------------------------------------
def test_the_start_up_check_tests_the_range_pyproject_allows(pyproject):
    from service.connections import UVICORN_TESTED

    (uvicorn,) = [r for r in project_requirements(pyproject) if r.name == "uvicorn"]
    assert uvicorn.specifier == UVICORN_TESTED


@pytest.mark.parametrize("version", ["0.29.0", "0.56.0", "1.0.0"])
def test_an_untested_uvicorn_is_refused_in_one_sentence(version):
    from service.connections import check_uvicorn

    with pytest.raises(RuntimeError) as refused:
        check_uvicorn(version)
    message = str(refused.value)
    assert message.startswith(f"uvicorn {version} is not a release") and "docker/requirements.lock" in message
    assert "\n" not in message


def test_the_locked_uvicorn_passes_the_check(lock):
    from service.connections import check_uvicorn

    (pin,) = next(r for r in lock if r.name == "uvicorn").specifier
    check_uvicorn(pin.version)
    check_uvicorn("0.30.0")


def test_fer_serve_refuses_to_start_with_an_untested_uvicorn():
    """The whole start-up: one line on stderr and exit code 2, before any model is loaded."""
    code = (
        "import sys, uvicorn; uvicorn.__version__ = '0.99.0'; from cli.main import main; "
        f"sys.exit(main(['serve', '--port', '{free_port()}']))"
    )
    env = {**os.environ, "FER_PRESET": "demo", "FER_DEVICE": "cpu", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("fer: error: uvicorn 0.99.0 is not a release")
    assert result.stderr.count("\n") == 1
