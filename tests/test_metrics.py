"""Metrics across server processes (prometheus_client's multiprocess mode), in real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]

# One "worker": counts `n` requests, sets its queue depth to `n`, and prints a scrape.
WORKER = """
import sys
from service.metrics import Metrics

n = int(sys.argv[1])
metrics = Metrics()
for _ in range(n):
    metrics.observe_request("/predict", 200, 0.01)
metrics.queue_depth.set(n)
sys.stdout.buffer.write(metrics.exposition())
"""


def worker(directory: Path, n: int) -> subprocess.Popen:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", WORKER, str(n)], env=env, stdout=subprocess.PIPE)


def samples(exposition: str) -> dict[str, float]:
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name in ("fer_requests_total", "fer_queue_depth")
    }


def test_a_scrape_sums_every_process_and_drops_an_exited_one_s_queue(tmp_path):
    first = worker(tmp_path, 2)
    first.communicate()  # it has exited, without any clean-up (as a crashed worker would)
    second = worker(tmp_path, 3)
    scraped = samples(second.communicate()[0].decode())
    assert second.returncode == 0
    assert scraped["fer_requests_total"] == 2 + 3  # counters stay after a process ends
    assert scraped["fer_queue_depth"] == 3  # the exited process's queue is gone


def test_one_process_scrapes_its_own_registry(tmp_path, monkeypatch):
    from service.metrics import Metrics

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    first, second = Metrics(), Metrics()  # two apps in one process (tests) do not mix
    first.observe_request("/predict", 200, 0.01)
    assert samples(first.exposition().decode())["fer_requests_total"] == 1
    assert "fer_requests_total" not in samples(second.exposition().decode())


def test_a_gpu_service_reports_its_peak_device_memory_and_a_cpu_one_does_not(monkeypatch):
    from service.metrics import Metrics

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    allocated = iter([1000, 5000])
    gpu, cpu = Metrics(), Metrics()
    on_gpu, on_cpu = gpu.batch_stats(lambda: next(allocated)).on_batch, cpu.batch_stats().on_batch
    for on_batch in (on_gpu, on_gpu, on_cpu):
        on_batch(8, 0.01)

    def peak(metrics):
        return [
            sample.value
            for family in text_string_to_metric_families(metrics.exposition().decode())
            for sample in family.samples
            if sample.name == "fer_device_peak_bytes"
        ]

    assert peak(gpu) == [5000] and peak(cpu) == []  # read after every call; no 0 on a CPU


def test_only_a_cuda_device_is_asked_for_its_peak():
    import torch

    from service.runtime import _device_peak_bytes

    assert _device_peak_bytes(torch.device("cpu")) is None
    assert callable(_device_peak_bytes(torch.device("cuda", 0)))  # not called: no GPU here


def test_the_app_records_through_the_metrics_object_it_is_given(engine):
    """The seam service.ray_serve's RayMetrics uses: every count and observation goes through
    `Metrics.record` of the object the app was made with."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.metrics import Metrics
    from tests.support import face_image, png, post_image, service_settings, wait_ready

    class Recording(Metrics):
        def __init__(self):
            super().__init__()
            self.seen = []

        def record(self, family, value, *labels):
            super().record(family, value, *labels)
            self.seen.append((family.name, labels))

    metrics = Recording()
    with TestClient(
        create_app(service_settings(), engine_factory=lambda s: engine, metrics=metrics)
    ) as client:
        wait_ready(client)
        assert post_image(client, png(face_image(0)), detect_faces="false").status_code == 200
        assert 'fer_requests_total{endpoint="/predict",status="200"} 1.0' in client.get("/metrics").text
    assert ("fer_requests", ("/predict", "200")) in metrics.seen
    recorded = {name for name, _ in metrics.seen}
    assert {
        "fer_request_seconds",
        "fer_batch_size",
        "fer_model_seconds",
        "fer_queue_wait_seconds",
    } <= recorded
    assert "fer_text_seconds" in recorded  # the warm-up's text features
