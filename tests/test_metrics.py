"""Metrics across server processes (prometheus_client's multiprocess mode), in real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]

# One "worker": counts `n` requests and sets its queue depth to `n`; optionally exits as a server
# process does (Metrics.process_exiting) and optionally prints a scrape.
WORKER = """
import sys
from service.metrics import Metrics

n, exiting, scrape = int(sys.argv[1]), sys.argv[2] == "exit", sys.argv[3] == "scrape"
metrics = Metrics()
for _ in range(n):
    metrics.observe_request("/predict", 200, 0.01)
metrics.queue_depth.set(n)
if exiting:
    metrics.process_exiting()
if scrape:
    sys.stdout.buffer.write(metrics.exposition())
"""


def worker(directory: Path, n: int, exiting: bool = False, scrape: bool = False) -> str:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), "PYTHONPATH": str(ROOT)}
    args = [str(n), "exit" if exiting else "stay", "scrape" if scrape else "quiet"]
    done = subprocess.run([sys.executable, "-c", WORKER, *args], env=env, capture_output=True, check=True)
    return done.stdout.decode()


def samples(exposition: str) -> dict[str, float]:
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name in ("fer_requests_total", "fer_queue_depth")
    }


def test_a_scrape_sums_every_process_and_drops_an_exited_one_s_queue(tmp_path):
    worker(tmp_path, 2)
    worker(tmp_path, 5, exiting=True)
    scraped = samples(worker(tmp_path, 3, scrape=True))
    assert scraped["fer_requests_total"] == 2 + 5 + 3  # counters stay after a process ends
    assert scraped["fer_queue_depth"] == 2 + 3  # the exited process's queue is gone


def test_one_process_scrapes_its_own_registry(tmp_path, monkeypatch):
    from service.metrics import Metrics

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    first, second = Metrics(), Metrics()  # two apps in one process (tests) do not mix
    first.observe_request("/predict", 200, 0.01)
    assert samples(first.exposition().decode())["fer_requests_total"] == 1
    assert "fer_requests_total" not in samples(second.exposition().decode())
