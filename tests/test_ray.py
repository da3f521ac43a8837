"""The Ray path: the service on Ray Serve (service/ray_serve.py, deploy/*.yaml) and the offline jobs on
Ray Data (`--ray`), on one local Ray cluster for the module, with tiny models.

The cluster has logical resources (8 CPUs, 1 GPU) whatever the machine has, so a 2-core CI machine
without a GPU still schedules the GPU paths (a GPU actor there sees no CUDA device and runs on the CPU).
Results are compared with the single-process service and commands; nothing here is timed."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")

from fastapi.testclient import TestClient  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.config import AutoscalingConfig  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from cli.main import main  # noqa: E402
from service.app import create_app  # noqa: E402
from service.request_ids import CLIENT_ID  # noqa: E402
from service.settings import ServiceSettings  # noqa: E402
from tests import test_train  # noqa: E402
from tests.support import free_port, make_video, two_faces, wait_ready, wait_until  # noqa: E402
from tests.test_eval import make_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIGS = [ROOT / "deploy" / "serve.yaml", ROOT / "deploy" / "serve-cpu.yaml"]
KUBERAY = ROOT / "deploy" / "kuberay.yaml"
DEADLINE_S = 240  # a deployment that is neither running nor failed by then is a failure, not a hang
# The replicas' settings, and the same for the reference app in this process.
SERVICE_ENV = {
    "FER_PRESET": "demo",
    "FER_DEVICE": "auto",  # no GPU given to the replicas: they say so and run on the CPU
    "FER_DTYPE": "float32",
    "FER_MAX_UPLOAD_MB": "1",
}
NO_GPU_LINE = "FER_DEVICE=auto: Ray gave this replica no GPU"
PROXY_CALLBACK = "service.request_ids:serve_proxy_middlewares"
# The training tests' tiny BLIP-2 teacher and image folder, as fixtures of this module too.
teacher_dir = test_train.teacher_dir
image_dir = test_train.image_dir


@dataclass
class Cluster:
    temp_dir: Path
    metrics_port: int


@pytest.fixture(scope="module")
def cluster():
    # Under /tmp and short: Ray's socket paths live in it (AF_UNIX paths are limited to 107 bytes).
    temp_dir = Path(tempfile.mkdtemp(prefix="fer-ray-", dir="/tmp"))
    metrics_port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        # As docs/ray.md has Ray started: Serve's proxies keep a client's request id only when plain.
        patch.setenv(
            "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "service.request_ids:serve_proxy_middlewares"
        )
        ray.init(
            num_cpus=8,
            num_gpus=1,
            include_dashboard=False,
            object_store_memory=256 * 2**20,
            log_to_driver=False,
            _temp_dir=str(temp_dir),
            _metrics_export_port=metrics_port,
            _system_config={"metrics_report_interval_ms": 1000},
        )
        try:
            yield Cluster(temp_dir, metrics_port)
        finally:
            serve.shutdown()
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


def deployment_options(config: Path, **overrides) -> dict:
    """The config file's deployment options as `.options()` takes them, with the test's overrides."""
    entry = dict(yaml.safe_load(config.read_text())["applications"][0]["deployments"][0])
    entry.pop("name")
    return {**entry, **overrides}


def deploy(app, name: str, route_prefix: str) -> str:
    """Starts an application and waits, with a deadline, until it runs or fails: its final status."""
    serve.run_many(
        [serve.RunTarget(app, name=name, route_prefix=route_prefix)],
        wait_for_ingress_deployment_creation=False,
        wait_for_applications_running=False,
    )

    def settled() -> str | None:
        status = serve.status().applications.get(name)
        return status.status if status is not None and status.status in ("RUNNING", "DEPLOY_FAILED") else None

    return wait_until(settled, f"{name} running or failing", seconds=DEADLINE_S, every=0.5)


@pytest.fixture(scope="module")
def service(cluster):
    """Two replicas of deploy/serve.yaml's deployment (CPU, the demo model) behind Serve's proxy."""
    from service.ray_serve import FerReplica

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = yaml.safe_load(SERVE_CONFIGS[0].read_text())["applications"][0]
    env = {**config["runtime_env"]["env_vars"], **SERVICE_ENV}
    env.pop("FER_WEIGHTS_DIR")  # the demo model has no files
    options = deployment_options(
        SERVE_CONFIGS[0],
        num_replicas=2,
        autoscaling_config=None,
        ray_actor_options={"num_cpus": 1, "num_gpus": 0, "runtime_env": {"env_vars": env}},
        max_constructor_retry_count=1,
    )
    assert deploy(FerReplica.options(**options).bind(), "fer", "/") == "RUNNING"
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client
    serve.delete("fer")


@pytest.fixture(scope="module")
def reference():
    """The same service under uvicorn's ASGI interface, in this process."""
    settings = ServiceSettings(**{k.removeprefix("FER_").lower(): v for k, v in SERVICE_ENV.items()})
    with TestClient(create_app(settings.model_copy(update={"device": "cpu"}))) as client:
        wait_ready(client)
        yield client


def without_timing(answer):
    if isinstance(answer, dict):
        return {k: without_timing(v) for k, v in answer.items() if k != "timing"}
    if isinstance(answer, list):
        return [without_timing(v) for v in answer]
    return answer


def assert_same_answer(got, expected, path="answer") -> None:
    """Equal, floats up to the last bits (the replicas' encoder runs on other thread counts)."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), path
        for key in expected:
            assert_same_answer(got[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), path
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_same_answer(a, b, f"{path}[{i}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, abs=1e-5), path
    else:
        assert got == expected, path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("ray-inputs")
    faces, _ = two_faces()
    return {"faces.png": faces, "clip.mp4": make_video(folder / "clip.mp4", 20).read_bytes()}


# ---- Ray Serve -----------------------------------------------------------------------------------
def test_two_replicas_are_ready_at_once_and_answer_as_uvicorn(service, reference, inputs):
    assert service.get("/readyz").status_code == 200  # serve reported RUNNING: every replica is warm
    requests = [
        ("/predict", "faces.png", "image/png", {"classes": "basic8"}),
        ("/predict-video", "clip.mp4", "video/mp4", {"frames": "4", "per_frame": "true"}),
        ("/retrieve", "clip.mp4", "video/mp4", {"descriptions": json.dumps(["smiles", "frowns", "yawns"])}),
        ("/retrieve", "faces.png", "image/png", {"descriptions": json.dumps(["smiles", "frowns"])}),
    ]
    for path, name, media_type, data in requests:
        files = {"file": (name, inputs[name], media_type)}
        got, expected = (
            service.post(path, files=files, data=data),
            reference.post(path, files=files, data=data),
        )
        assert got.status_code == expected.status_code == 200, got.text
        assert_same_answer(without_timing(got.json()), without_timing(expected.json()), path)
    assert (
        len(
            service.post("/predict", files={"file": ("f.png", inputs["faces.png"], "image/png")}).json()[
                "faces"
            ]
        )
        == 2
    )


def test_errors_are_mapped_as_under_uvicorn(service, reference, inputs):
    too_large = np.random.default_rng(0).bytes(2 * 2**20)  # FER_MAX_UPLOAD_MB=1
    cases = [
        ({"file": ("big.png", too_large, "image/png")}, {}, 413),
        ({"file": ("notes.txt", b"hello", "text/plain")}, {}, 415),
        ({"file": ("faces.png", inputs["faces.png"], "image/png")}, {"classes": "nosuchclass"}, 422),
    ]
    for files, data, status in cases:
        got, expected = (
            service.post("/predict", files=files, data=data),
            reference.post("/predict", files=files, data=data),
        )
        assert got.status_code == expected.status_code == status
        assert got.json()["error"] == expected.json()["error"]


def test_one_request_id_per_request_the_clients_when_plain(service, cluster):
    """Serve's proxy answers with its request id and logs it; the app's error bodies and log lines carry
    the same one, and no second header is added. A client's id is kept when it is plain."""
    refused = {"file": ("notes.txt", b"hello", "text/plain")}  # a 415, whose body names the id
    seen = []
    for sent, kept in [
        (None, False),
        ("client-42.a_b", True),
        ("not plain: spaces", False),
        ("x" * 65, False),
    ]:
        answer = service.post("/predict", files=refused, headers={"X-Request-ID": sent} if sent else {})
        assert answer.status_code == 415
        ids = answer.headers.get_list("x-request-id")
        assert len(ids) == 1 and answer.json()["request_id"] == ids[0], (sent, ids, answer.json())
        assert (ids[0] == sent) == kept and CLIENT_ID.fullmatch(ids[0]), (sent, ids)
        seen.append(ids[0])
    logs = cluster.temp_dir / "session_latest" / "logs" / "serve"

    def logged() -> bool:  # Serve writes its access log as it goes
        proxy = "".join(p.read_text() for p in logs.glob("proxy_*.log"))
        return all(request_id in proxy for request_id in seen)

    wait_until(logged, "Serve's proxy log naming every request id", seconds=30)


def test_32_concurrent_requests_all_succeed(service, inputs):
    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=str(service.base_url), timeout=120) as client:
            files = {"file": ("faces.png", inputs["faces.png"], "image/png")}
            answers = await asyncio.gather(*(client.post("/predict", files=files) for _ in range(32)))
            return [answer.status_code for answer in answers]

    assert asyncio.run(burst()) == [200] * 32


def test_fer_metrics_are_exported_per_replica(service, cluster, inputs):
    for _ in range(4):
        service.post("/predict", files={"file": ("faces.png", inputs["faces.png"], "image/png")})
    # One replica's own /metrics, through the proxy: that replica's counters only.
    assert "fer_requests_total" in service.get("/metrics").text
    # The node's export port: ray_fer_* tagged per replica (exported every metrics_report_interval_ms).

    def exported() -> str | None:
        text = httpx.get(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=10).text
        replicas = {
            line.split('replica="', 1)[1].split('"', 1)[0]
            for line in text.splitlines()
            if line.startswith("ray_fer_requests_total{") and 'endpoint="/predict"' in line
        }
        return text if len(replicas) == 2 else None

    text = wait_until(exported, "both replicas' requests, each with its replica tag", seconds=60, every=1)
    for name in ("ray_fer_ready_processes", "ray_fer_batch_size_bucket", "ray_fer_request_seconds_bucket"):
        assert name in text


def test_each_replica_logs_its_device_and_threads_from_the_cpus_ray_gave_it(service, cluster):
    logs = list((cluster.temp_dir / "session_latest" / "logs" / "serve").glob("replica_fer_fer_*.log"))
    assert len(logs) == 2
    for path in logs:
        text = path.read_text()
        # num_cpus: 1, whatever the machine's cores (torch alone would take them all)
        assert "replica on cpu; threads: encoder 1, decode 1, video decode 1;" in text
        assert NO_GPU_LINE in text  # FER_DEVICE=auto and no GPU given: said, and the CPU is used


def test_missing_weights_fail_the_deployment_with_the_download_command(cluster, service, tmp_path):
    from service.ray_serve import FerReplica

    env = {**SERVICE_ENV, "FER_PRESET": "exp-clip-b32", "FER_WEIGHTS_DIR": str(tmp_path / "empty")}
    options = {
        "name": "fer",
        "num_replicas": 1,
        "max_constructor_retry_count": 1,
        "ray_actor_options": {"num_cpus": 1, "runtime_env": {"env_vars": env}},
    }
    assert deploy(FerReplica.options(**options).bind(), "missing", "/missing") == "DEPLOY_FAILED"
    message = serve.status().applications["missing"].deployments["fer"].message
    assert "fer weights download exp-clip-b32" in message
    serve.delete("missing")
    assert service.get("/readyz").status_code == 200  # the other application is untouched


# ---- the config files ----------------------------------------------------------------------------
def unknown_keys(raw, model, path="") -> list[str]:
    """Keys of the raw config that the validated pydantic model has no field for (Serve's schema
    accepts and drops them, so a typo would silently be a default)."""
    from pydantic import BaseModel

    found = []
    if isinstance(model, BaseModel) and isinstance(raw, dict):
        fields = type(model).model_fields
        names = set(fields) | {f.alias for f in fields.values() if f.alias}
        found += [f"{path}{key}" for key in raw if key not in names]
        for key, value in raw.items():
            if key in fields:
                found += unknown_keys(value, getattr(model, key), f"{path}{key}.")
    elif isinstance(model, list) and isinstance(raw, list):
        for i, (r, m) in enumerate(zip(raw, model, strict=True)):
            found += unknown_keys(r, m, f"{path}{i}.")
    return found


@pytest.mark.parametrize("config", SERVE_CONFIGS, ids=lambda p: p.name)
def test_the_serve_config_validates_and_points_at_the_deployment(config):
    raw = yaml.safe_load(config.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert unknown_keys(raw, schema) == []
    (app,) = schema.applications
    (deployment,) = app.deployments
    assert app.import_path == "service.ray_serve:app" and app.route_prefix == "/"
    module, attribute = app.import_path.split(":")
    from ray.serve import Application

    assert isinstance(getattr(__import__(module, fromlist=[attribute]), attribute), Application)

    env = app.runtime_env["env_vars"]
    assert all(isinstance(value, str) for value in env.values())
    assert env["GOMP_SPINCOUNT"] == "10000"
    settings = ServiceSettings(
        **{k.removeprefix("FER_").lower(): v for k, v in env.items() if k.startswith("FER_")}
    )
    assert deployment.max_ongoing_requests >= 4 * settings.max_batch  # far above Serve's default of 5
    assert (
        deployment.backpressure_config.status_code == 429 and deployment.backpressure_config.retry_after_s > 0
    )
    assert deployment.max_queued_requests > 0
    assert deployment.graceful_shutdown_timeout_s >= 30 and deployment.health_check_period_s > 0
    raw_scaling = raw["applications"][0]["deployments"][0].get("autoscaling_config")
    if raw_scaling is not None:
        assert set(raw_scaling) <= set(AutoscalingConfig.model_fields)
        scaling = AutoscalingConfig.model_validate(raw_scaling)
        assert 1 <= scaling.min_replicas <= scaling.initial_replicas <= scaling.max_replicas
        assert settings.max_batch <= scaling.target_ongoing_requests <= deployment.max_ongoing_requests
    gpus = deployment.ray_actor_options.num_gpus
    if config.name == "serve.yaml":  # a cluster's: GPU replicas, weights at the same path on every node
        assert (gpus, env["FER_DEVICE"]) == (1, "cuda") and env["FER_WEIGHTS_DIR"].startswith("/")
    else:
        assert (gpus, env["FER_DEVICE"]) == (0, "cpu")


def test_the_kuberay_manifest_has_what_kuberay_requires():
    manifest = yaml.safe_load(KUBERAY.read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    spec = manifest["spec"]
    assert isinstance(spec["serveConfigV2"], str)
    embedded = yaml.safe_load(spec["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    assert embedded == yaml.safe_load(SERVE_CONFIGS[0].read_text())  # the same settings as serve.yaml

    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    groups = [head, *cluster["workerGroupSpecs"]]
    for group in groups:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # KubeRay: strings only
        (container,) = group["template"]["spec"]["containers"]
        assert container["name"] and container["image"]
        env = {e["name"]: e["value"] for e in container.get("env", [])}  # every node runs a Serve proxy
        assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == PROXY_CALLBACK
        for probe in ("readinessProbe", "livenessProbe"):  # the image has no wget for KubeRay's defaults
            assert container[probe]["exec"]["command"][0] == "python"
    assert head["rayStartParams"]["num-cpus"] == "0"
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["groupName"] and 1 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    deployment = embedded["applications"][0]["deployments"][0]
    assert gpu["maxReplicas"] >= deployment["autoscaling_config"]["max_replicas"]
    pod = gpu["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    mounts = {m["name"]: m for m in worker["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    weights_dir = embedded["applications"][0]["runtime_env"]["env_vars"]["FER_WEIGHTS_DIR"]
    (weights,) = [name for name, m in mounts.items() if m["mountPath"] == weights_dir]
    assert volumes[weights]["persistentVolumeClaim"]["claimName"]
    (shm,) = [name for name, m in mounts.items() if m["mountPath"] == "/dev/shm"]
    assert volumes[shm]["emptyDir"]["medium"] == "Memory"


# ---- Ray Data: the offline commands --------------------------------------------------------------
@contextmanager
def torch_threads(n: int):
    """The single-process reference on as many torch threads as a 1-CPU actor has (Ray sets its
    OMP_NUM_THREADS to 1), so both compute bit for bit alike."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


RAY_ARGS = ["--ray", "--ray-actors", "1", "--ray-decoders", "1", "--ray-cpus", "1"]


def test_train_extract_on_ray_writes_the_same_cache_and_resumes_by_shard(
    cluster,
    model_env,
    teacher_dir,
    image_dir,
    tmp_path,
    capsys,
):
    common = ["train", "extract", "--images", str(image_dir), "--teacher", str(teacher_dir)]
    common += ["--extract-batch-size", "2", "--shard-size", "4", "--instruction", "expert"]
    with torch_threads(1):
        assert main([*common, "--cache", str(tmp_path / "one"), "--workers", "0"]) == 0
    single = json.loads(capsys.readouterr().out)
    # 0.5 GPU a model actor: the CLIP and the teacher actor share the (logical) GPU.
    assert main([*common, "--cache", str(tmp_path / "ray"), *RAY_ARGS, "--ray-gpus", "0.5"]) == 0
    on_ray = json.loads(capsys.readouterr().out)
    assert {**on_ray, "cache": ""} == {**single, "cache": ""}
    assert (on_ray["pairs"], on_ray["failed"], on_ray["shards"]) == (7, 1, 2)
    for name in ("index.json", "images.txt", "shard-00000.safetensors", "shard-00001.safetensors"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name

    # A lost shard is recomputed, alone; the other is not touched.
    kept = (tmp_path / "ray" / "shard-00000.safetensors").stat().st_mtime_ns
    (tmp_path / "ray" / "shard-00001.safetensors").unlink()
    assert main([*common, "--cache", str(tmp_path / "ray"), *RAY_ARGS, "--ray-gpus", "0.5"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["shards_skipped"] == 1 and resumed["pairs"] == 7
    assert (tmp_path / "ray" / "shard-00000.safetensors").stat().st_mtime_ns == kept
    for name in ("index.json", "shard-00001.safetensors"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_a_cache_started_without_ray_resumes_on_ray_with_relative_paths(
    cluster, model_env, tiny_clip_path, teacher_dir, image_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FER_CLIP_WEIGHTS", os.path.relpath(tiny_clip_path))
    common = ["train", "extract", "--images", str(image_dir), "--teacher", os.path.relpath(teacher_dir)]
    common += [
        "--cache",
        "cache",
        "--extract-batch-size",
        "2",
        "--shard-size",
        "4",
        "--instruction",
        "expert",
    ]
    with torch_threads(1):
        assert main([*common, "--workers", "0"]) == 0
    lost = tmp_path / "cache" / "shard-00001.safetensors"
    single = lost.read_bytes()
    lost.unlink()
    capsys.readouterr()
    assert main([*common, *RAY_ARGS, "--ray-gpus", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["shards_skipped"] == 1
    assert lost.read_bytes() == single


def test_eval_on_ray_gives_the_same_metrics(cluster, model_env, official_projection_path, tmp_path, capsys):
    make_dataset(tmp_path / "data")
    common = ["eval", "--data", str(tmp_path / "data"), "--prompts", "P-1,P-4", "--frames", "4"]
    common += ["--models", f"{official_projection_path},none", "--batch-size", "3"]
    with torch_threads(1):
        assert main([*common, "--out", str(tmp_path / "one")]) == 0
    # Whole-GPU actors (the default with a GPU): the text actor starts once the encoder actors are done.
    assert main([*common, "--out", str(tmp_path / "ray"), *RAY_ARGS]) == 0
    capsys.readouterr()
    for name in ("metrics.json", "predictions.csv", "table.md", "prompts.json"):
        assert (tmp_path / "ray" / name).read_text() == (tmp_path / "one" / name).read_text(), name


def test_eval_with_faces_on_ray_pools_the_same_main_tracks(cluster, model_env, tmp_path, capsys):
    """A clip of two people: the decode actors send its face boxes, the encoder actors keep its main
    track, as `fer eval` does in one process."""
    from model.faces.synthetic import Walk, astronaut_face, people_clip, recoloured

    make_dataset(tmp_path / "data")
    face = astronaut_face(context=0.3)
    walks = [
        Walk(recoloured(face, 0), (0.3, 0.5), (0.35, 0.5), (0.08, 0.14)),
        Walk(recoloured(face, 1), (0.7, 0.5), (0.65, 0.5), (0.14, 0.08)),
    ]
    people_clip(tmp_path / "data" / "happiness" / "people.mp4", walks, n_frames=24)
    common = ["eval", "--data", str(tmp_path / "data"), "--prompts", "P-1", "--frames", "8", "--detect-faces"]
    common += ["--batch-size", "3"]
    with torch_threads(1):
        assert main([*common, "--out", str(tmp_path / "one")]) == 0
    assert main([*common, "--out", str(tmp_path / "ray"), *RAY_ARGS, "--ray-gpus", "0"]) == 0
    capsys.readouterr()
    for name in ("metrics.json", "predictions.csv"):
        assert (tmp_path / "ray" / name).read_text() == (tmp_path / "one" / name).read_text(), name
    assert "people.mp4" in (tmp_path / "one" / "predictions.csv").read_text()


def test_eval_retrieval_on_ray_gives_the_same_metrics(cluster, model_env, tmp_path, capsys):
    make_dataset(tmp_path / "data")
    pairs = tmp_path / "data" / "pairs.csv"
    with pairs.open("w") as f:
        f.write("file,description\nhappiness/h1.png,smiles\nhappiness/h4.mp4,laughs\nsadness/s1.png,cries\n")
        f.write("anger/a1.mp4,frowns\nsadness/broken.png,cries\n")
    common = ["eval-retrieval", "--data", str(pairs), "--k", "1,2", "--frames", "4"]
    with torch_threads(1):
        assert main([*common, "--out", str(tmp_path / "one")]) == 0
    assert main([*common, "--out", str(tmp_path / "ray"), *RAY_ARGS, "--ray-gpus", "0"]) == 0
    capsys.readouterr()
    for name in ("metrics.json", "ranks.csv"):
        assert (tmp_path / "ray" / name).read_text() == (tmp_path / "one" / name).read_text(), name


def test_a_missing_teacher_on_ray_is_the_same_one_line_error(cluster, model_env, image_dir, tmp_path, capsys):
    argv = ["train", "extract", "--images", str(image_dir), "--teacher", "nobody/blip2-not-cached"]
    assert main([*argv, "--cache", str(tmp_path / "one")]) == 2
    single = capsys.readouterr().err.strip()
    assert main([*argv, "--cache", str(tmp_path / "ray"), *RAY_ARGS]) == 2
    assert capsys.readouterr().err.strip() == single
    assert single.startswith("fer: error: teacher nobody/blip2-not-cached") and "\n" not in single
    assert not (tmp_path / "ray").exists()  # nothing written before the models were found
