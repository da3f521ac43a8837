"""`fer serve` and the process it configures: the entry point's threads, settings refused before
anything loads, a full-size model over real HTTP, and several worker processes."""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest
import torch

from service.settings import ServiceSettings
from tests.support import face_image, fer_serve, free_port, make_video, png, two_faces, wait_until


def test_the_process_entry_point_gives_the_cpus_to_the_encoder_and_pins_its_own_thread():
    from service.process import configure_process

    seen = {}

    def entry_point():  # a thread of its own: the pinning is that thread's
        cpus = torch.get_num_threads()
        resolved = configure_process(ServiceSettings(decode_workers=5))
        seen.update(cpus=cpus, resolved=resolved, after=torch.get_num_threads())

    thread = threading.Thread(target=entry_point)
    thread.start()
    thread.join()
    assert seen["resolved"].device_threads == seen["cpus"] and seen["resolved"].decode_workers == 5
    assert seen["after"] == 1


def test_service_settings_are_validated():
    with pytest.raises(ValueError, match="FER_MAX_QUEUE"):
        ServiceSettings(max_queue=8, max_batch=32)


# ---- fer serve ---------------------------------------------------------------------------------------
def test_fer_serve_on_a_port_in_use_fails_at_once(monkeypatch, capsys):
    import socket

    from cli.main import main

    monkeypatch.setenv("FER_PRESET", "demo")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        assert main(["serve", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert time.monotonic() - started < 5  # refused before any model was loaded


def test_fer_serve_refuses_to_start_without_weights(monkeypatch, tmp_path, capsys):
    from cli.main import main

    monkeypatch.setenv("FER_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("FER_PRESET", "exp-clip-b32")
    assert main(["serve", "--port", str(free_port())]) == 2
    assert "fer weights download exp-clip-b32" in capsys.readouterr().err


def test_fer_serve_refuses_settings_that_cannot_work(model_env, monkeypatch, capsys):
    from cli.main import main

    monkeypatch.setenv("FER_DTYPE", "float16")  # model_env sets FER_DEVICE=cpu
    assert main(["serve", "--port", str(free_port())]) == 2
    assert "FER_DTYPE=float16 runs on CUDA only" in capsys.readouterr().err
    monkeypatch.setenv("FER_DTYPE", "float32")
    assert main(["serve", "--port", str(free_port()), "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("preset, expected", [(None, "10000"), ("300000", "300000")])
def test_fer_serve_sets_the_openmp_spin_count_unless_the_user_did(model_env, monkeypatch, preset, expected):
    import uvicorn

    import service.process
    from cli.main import main

    monkeypatch.setenv("GOMP_SPINCOUNT", preset or "")  # recorded, so the test's change is undone
    if preset is None:
        monkeypatch.delenv("GOMP_SPINCOUNT")
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(spin=os.environ.get("GOMP_SPINCOUNT")))
    monkeypatch.setattr(service.process, "pin_torch_threads", lambda n: None)  # this thread is the test's
    assert main(["serve", "--port", str(free_port())]) == 0
    assert seen == {"spin": expected}


@pytest.mark.slow
def test_fer_serve_answers_every_endpoint_with_a_full_size_model(tmp_path, full_size_checkpoint):
    """`fer serve` on a random-weight ViT-B-32 checkpoint and a random official-format projection, both
    given by path, over real HTTP on loopback."""
    clip_path, projection_path = full_size_checkpoint
    env = {
        "FER_CLIP_MODEL": "ViT-B-32",
        "FER_CLIP_WEIGHTS": str(clip_path),
        "FER_PROJECTION": str(projection_path),
        "FER_FACE_DETECTOR": "haar",
        "FER_DEVICE": "cpu",
    }
    with fer_serve(env) as (http, _):
        data, _ = two_faces()
        image = http.post("/predict", files={"file": ("f.png", data, "image/png")}).json()
        assert len(image["faces"]) == 2 and len(image["probabilities"]) == 7
        clip = make_video(tmp_path / "c.mp4", 30).read_bytes()
        video = http.post("/predict-video", files={"file": ("c.mp4", clip, "video/mp4")}).json()
        assert video["frames_sampled"] == 16
        ranked = http.post(
            "/retrieve", files={"file": ("c.mp4", clip, "video/mp4")}, data={"descriptions": '["a", "b"]'}
        ).json()
        assert len(ranked["ranking"]) == 2
        assert http.get("/labels").status_code == 200 and "fer_batch_size" in http.get("/metrics").text


@pytest.mark.slow
def test_fer_serve_with_several_worker_processes():
    import psutil

    with fer_serve({"FER_PRESET": "demo", "FER_DEVICE": "cpu", "FER_WORKERS": "2"}) as (http, server):
        answers = [
            http.post("/predict", files={"file": ("f.png", png(face_image(i)), "image/png")})
            for i in range(4)
        ]
        assert [a.status_code for a in answers] == [200] * 4
        # uvicorn spawns its workers through multiprocessing; its resource tracker is a child too
        children = psutil.Process(server.pid).children(recursive=True)
        workers = [p for p in children if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 2, "expected one worker process per FER_WORKERS"

        # Fresh connections land on either worker; every scrape counts every process's requests.
        url = str(http.base_url)
        wait_until(  # the second worker may still be loading
            lambda: _scrape(url).get("fer_ready_processes") == 2, "the second worker's readiness", seconds=300
        )
        image = png(face_image(0))
        fresh = [
            httpx.post(f"{url}/predict", files={"file": ("f.png", image, "image/png")}, timeout=60)
            for _ in range(6)
        ]
        assert [a.status_code for a in fresh] == [200] * 6
        for _ in range(6):
            assert _scrape(url)["fer_requests_total"] == 4 + 6


def _scrape(url: str) -> dict[str, float]:
    """fer_ready_processes and /predict's fer_requests_total, from a scrape on a fresh connection."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=60).text):
        for sample in family.samples:
            if sample.name == "fer_ready_processes" or (
                sample.name == "fer_requests_total" and sample.labels["endpoint"] == "/predict"
            ):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals
