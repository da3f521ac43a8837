"""The Docker files, checked without a Docker engine: hadolint, the compose specification's JSON schema,
and the commands they run parsed by the real CLI. The image's install command is run by .ci/run
(docker/install.sh in a fresh virtual environment)."""

from __future__ import annotations

import http.server
import json
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import yaml

from cli.main import build_parser
from model.registry import PRESETS

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
README = ROOT / "README.md"
WEIGHTS_MOUNT = "/app/weights"
IMAGES = ("cuda", "cpu")  # the Dockerfile's targets: the default (its last stage) first


def _tool(name: str) -> str:
    """A console script of this environment (CI installs them with the dev extra), else one on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    assert found, f"{name} is a [dev] dependency: pip install -e '.[dev]'"
    return found


def instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile instructions as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    result, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped.removesuffix("\\").strip() + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    return result


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def stages(dockerfile) -> dict[str, list[tuple[str, str]]]:
    """Each build stage's instructions by the stage's name, its FROM line first."""
    result: dict[str, list[tuple[str, str]]] = {}
    for keyword, args in dockerfile:
        if keyword == "FROM":
            name = args.split()[-1]
            result[name] = []
        if result:
            result[name].append((keyword, args))
    return result


@pytest.fixture(scope="module", params=IMAGES)
def image(request, dockerfile) -> list[tuple[str, str]]:
    """One image's stage (each test that takes it runs for both)."""
    return stages(dockerfile)[request.param]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _only(dockerfile, keyword: str) -> str:
    found = [args for kw, args in dockerfile if kw == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return found[0]


def _exec_form(args: str) -> list[str]:
    return json.loads(args)


def _healthcheck_command(dockerfile) -> list[str]:
    args = _only(dockerfile, "HEALTHCHECK")
    return _exec_form(args[args.index("CMD ") + 4 :])


# ---- linters ------------------------------------------------------------------------------------------
def test_hadolint_passes():
    hadolint = _tool("hadolint")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_matches_the_compose_specification_schema():
    checker = _tool("check-jsonschema")
    command = [checker, "--builtin-schema", "vendor.compose-spec"]
    result = subprocess.run([*command, str(COMPOSE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_can_fail(tmp_path, compose):
    checker = _tool("check-jsonschema")
    broken = dict(compose, services={**compose["services"], "fer": {**compose["services"]["fer"], "gpus": 3}})
    path = tmp_path / "compose.yml"
    path.write_text(yaml.safe_dump(broken))
    command = [checker, "--builtin-schema", "vendor.compose-spec", str(path)]
    assert subprocess.run(command, capture_output=True).returncode != 0


# ---- the images -----------------------------------------------------------------------------------
def test_image_serves_on_port_8000_with_a_command_the_cli_accepts(image):
    command = _exec_form(_only(image, "CMD"))
    assert command[0] == "fer"
    args = build_parser().parse_args(command[1:])
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", 8000)
    assert _only(image, "EXPOSE") == "8000"


def test_image_runs_as_a_non_root_user_with_weights_in_a_volume(image):
    users = [args for kw, args in image if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert _exec_form(_only(image, "VOLUME")) == [WEIGHTS_MOUNT]
    env = " ".join(args for kw, args in image if kw == "ENV")
    assert f"FER_WEIGHTS_DIR={WEIGHTS_MOUNT}" in env
    preset = next(word.split("=", 1)[1] for word in env.split() if word.startswith("FER_PRESET="))
    assert preset in PRESETS


def test_the_default_target_is_the_cuda_image(dockerfile):
    assert list(stages(dockerfile)) == ["requirements", *reversed(IMAGES)]  # a plain build makes the last


def test_image_asks_the_driver_for_its_cuda_major_release_only(dockerfile):
    """torch's bundled CUDA 13.x libraries run on any CUDA 13 driver (R580+, minor version
    compatibility); the base image's own requirement names its minor release and would refuse R580."""
    base = next(args for kw, args in dockerfile if kw == "ARG" and args.startswith("CUDA_BASE="))
    major = base.split(":", 1)[1].split(".")[0]
    env = " ".join(args for kw, args in stages(dockerfile)["cuda"] if kw == "ENV").replace('"', "")
    assert f"NVIDIA_REQUIRE_CUDA=cuda>={major}.0 " in env + " "
    assert "R580" in (ROOT / "docs" / "serving.md").read_text()


def test_the_cpu_image_takes_torch_from_a_cpu_only_index(dockerfile):
    cpu = stages(dockerfile)["cpu"]
    assert cpu[0][1].startswith("${CPU_BASE} ")
    index = next(args for kw, args in cpu if kw == "ARG" and args.startswith("TORCH_INDEX_URL="))
    assert index.removeprefix("TORCH_INDEX_URL=").rstrip("/").endswith("/cpu")
    assert "TORCH_INDEX_URL:-" in (ROOT / "docker" / "install.sh").read_text()


def test_both_images_are_built_by_the_same_steps(dockerfile):
    """The cpu stage differs from the cuda one in its base, torch's index and the CUDA requirement only."""
    cuda, cpu = (stages(dockerfile)[name] for name in IMAGES)

    def steps(stage):
        return [
            (kw, " ".join(word for word in args.split() if not word.startswith("NVIDIA_REQUIRE_CUDA=")))
            for kw, args in stage[1:]
            if not (kw == "ARG" and args.startswith("TORCH_INDEX_URL="))
        ]

    assert steps(cuda) == steps(cpu)


def test_dependencies_are_installed_before_the_source_is_copied(image, dockerfile):
    """A source change rebuilds only the project's own layer: the dependency layer copies nothing of the
    project but its requirements' list, and both installs run the script CI runs."""
    installs = [i for i, (kw, args) in enumerate(image) if kw == "RUN" and "install.sh" in args]
    commands = [image[i][1].split("sh docker/install.sh ", 1)[1] for i in installs]
    assert commands == ["/opt/venv requirements.txt", "/opt/venv"]
    copied_first = [args for kw, args in image[: installs[0]] if kw == "COPY"]
    assert copied_first == [
        "docker/system.sh /tmp/system.sh",
        "--from=requirements /src/requirements.txt ./",
        "docker/ docker/",
    ]
    copied_next = {
        args.split()[0].rstrip("/") for kw, args in image[installs[0] : installs[1]] if kw == "COPY"
    }
    assert {"pyproject.toml", "model", "service", "cli"} <= copied_next
    assert not [args for kw, args in image if kw == "RUN" and "pip" in args and "install.sh" not in args]
    listed = [args for kw, args in stages(dockerfile)["requirements"] if kw == "COPY"]
    assert listed == ["pyproject.toml docker/requirements.py ./"]


def test_the_install_script_is_the_one_ci_runs_and_installs_the_project_with_its_extras():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "sh docker/install.sh " in ci
    script = (ROOT / "docker" / "install.sh").read_text()
    project = next(word for word in script.split() if "FER_EXTRAS:+" in word)
    for extras, expected in (("", "."), ("ray", ".[ray]")):  # not editable (-e): as the image has it
        expanded = subprocess.run(
            [shutil.which("sh"), "-euc", f"printf %s {project}"],
            env={"FER_EXTRAS": extras},
            capture_output=True,
            text=True,
        )
        assert expanded.stdout == expected, expanded.stderr


@pytest.mark.parametrize("extras", ["", "ray", "dev,ray"])
def test_the_dependency_layer_installs_what_pyproject_lists(tmp_path, extras):
    """docker/requirements.py lists the requirements from pyproject.toml alone (no source there)."""
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    listed = subprocess.run(
        [sys.executable, str(ROOT / "docker" / "requirements.py"), extras],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    assert listed == project["dependencies"] + [
        r for e in filter(None, extras.split(",")) for r in optional[e]
    ]


def test_image_copies_every_package_the_project_ships(image):
    """A new top-level package in pyproject.toml must also be copied into the image."""
    copied = {args.split()[0].rstrip("/") for kw, args in image if kw == "COPY" and "--from" not in args}
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for pattern in include["include"]:
        assert pattern.rstrip("*") in copied
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert not copied & ignored
    assert {".venv", ".git", "weights"} <= ignored


class _Readyz(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("status", [200, 503])
def test_healthcheck_passes_only_when_ready(image, status):
    handler = type("Handler", (_Readyz,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        command = _healthcheck_command(image)
        assert command[0] == "python"
        code = command[-1].replace(":8000/", f":{server.server_port}/")
        result = subprocess.run([sys.executable, *command[1:-1], code], capture_output=True, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert (result.returncode == 0) == (status == 200)


# ---- docker compose -----------------------------------------------------------------------------------
# Each server and the one-shot service that fetches its weights, from the same image (a CPU host builds
# only the cpu one).
SERVERS = {"fer": "weights", "fer-cpu": "weights-cpu"}


def test_compose_fetches_weights_once_before_serving(compose):
    services = compose["services"]
    for name, fetch in SERVERS.items():
        weights = services[fetch]
        args = build_parser().parse_args(weights["command"][1:])
        assert (args.command, args.weights_command) == ("weights", "download")
        assert args.presets == ["${FER_PRESET:-exp-clip-b32}"]
        assert weights["restart"] == "no"
        assert weights["image"] == services[name]["image"] and weights["build"] == services[name]["build"]
        assert weights.get("profiles") == services[name].get("profiles")
        assert services[name]["depends_on"] == {fetch: {"condition": "service_completed_successfully"}}
        assert services[name]["restart"] in ("unless-stopped", "always")
        assert services[name]["ports"] == ["${FER_PORT:-8000}:8000"]
        for service in (weights, services[name]):
            assert any(volume.endswith(f":{WEIGHTS_MOUNT}") for volume in service["volumes"])
            assert service["environment"]["FER_WEIGHTS_DIR"] == WEIGHTS_MOUNT


def test_compose_builds_each_service_from_its_image_s_target(compose, dockerfile):
    built = {name: service["build"] for name, service in compose["services"].items()}
    assert {name: build["target"] for name, build in built.items()} == {
        "weights": "cuda",
        "weights-cpu": "cpu",
        "fer": "cuda",
        "fer-cpu": "cpu",
        "fer-ray": "cuda",
    }
    assert {build["target"] for build in built.values()} <= set(stages(dockerfile))
    assert compose["services"]["fer-cpu"]["image"] != compose["services"]["fer"]["image"]


def test_compose_reserves_a_gpu_and_offers_a_cpu_profile(compose):
    services = compose["services"]
    assert "profiles" not in services["fer"]  # `docker compose up` alone serves
    devices = services["fer"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert services["fer"]["environment"]["FER_DEVICE"] == "cuda"

    cpu = services["fer-cpu"]
    assert cpu["profiles"] == ["cpu"] and "deploy" not in cpu
    assert cpu["environment"]["FER_DEVICE"] == "cpu"


def test_compose_healthcheck_and_command_match_the_image(compose, dockerfile):
    for name, fetch in SERVERS.items():
        service, image = (
            compose["services"][name],
            stages(dockerfile)[compose["services"][name]["build"]["target"]],
        )
        assert service["healthcheck"]["test"] == ["CMD", *_healthcheck_command(image)]
        assert service["command"] == _exec_form(_only(image, "CMD"))
        assert compose["services"][fetch]["healthcheck"] == {"disable": True}


def test_readme_documents_the_compose_commands(compose):
    readme = README.read_text()
    assert "docker compose up" in readme
    cpu = next(iter(compose["services"]["fer-cpu"]["profiles"]))
    assert f"docker compose --profile {cpu} up fer-cpu" in readme
    assert shlex.join(["fer", "weights", "download"]) in readme


def test_the_runtime_waits_longer_than_the_service_s_shutdown_grace(compose):
    """SIGTERM lets requests in flight finish within FER_SHUTDOWN_GRACE_S; the container runtime must
    not kill the process before that."""
    from service.settings import ServiceSettings

    grace = ServiceSettings.model_fields["shutdown_grace_s"].default
    for name in ("fer", "fer-cpu"):
        period = compose["services"][name]["stop_grace_period"]
        assert period.endswith("s") and float(period[:-1]) > grace
