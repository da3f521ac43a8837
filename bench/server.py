"""`fer serve` as a child process on 127.0.0.1: started on a free port, ready when every worker process
has its model loaded (/metrics' fer_ready_processes), its memory and CPU summed over its processes
(psutil), and stopped (terminate, then kill) when the benchmark is done."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from bench.load import LOOPBACK_HOST, parse_metrics

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK_HOST, 0))
        return sock.getsockname()[1]


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and its descendants (`fer serve --workers N` is a supervisor and N workers)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


class Service:
    """One service process with the given FER_* settings; use as a context manager."""

    def __init__(self, env: dict[str, str], log_path: Path, ready_timeout_s: float = 600.0):
        self.env = env
        self.workers = int(env.get("FER_WORKERS", "1"))
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.port = free_port()
        self.base_url = f"http://{LOOPBACK_HOST}:{self.port}"
        self.process: subprocess.Popen | None = None
        self.peak_rss_mb = 0.0  # the largest RSS seen at a reading

    def __enter__(self) -> Service:
        command = [
            sys.executable,
            "-m",
            "cli.main",
            "serve",
            "--host",
            LOOPBACK_HOST,
            "--port",
            str(self.port),
        ]
        shown = {k: ("***" if k == "FER_API_KEY" else v) for k, v in self.env.items()}
        log.info("starting %s with %s", " ".join(command[1:]), " ".join(f"{k}={v}" for k, v in shown.items()))
        # Not a caller's PROMETHEUS_MULTIPROC_DIR: two services would share one set of metrics.
        env = {**{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}, **self.env}
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                command, env=env, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def headers(self) -> dict[str, str]:
        """What every request to this service carries: its API key, when it has one."""
        key = self.env.get("FER_API_KEY")
        return {"X-API-Key": key} if key else {}

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the service exited with code {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                if self.metrics().get("fer_ready_processes", 0) >= self.workers:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(
            f"the service was not ready within {self.ready_timeout_s:.0f} s:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def rss_mb(self) -> float:
        rss = sum(p.memory_info().rss for p in process_tree(self.process.pid)) / 2**20
        self.peak_rss_mb = max(self.peak_rss_mb, rss)
        return rss

    def cpu_seconds(self) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in process_tree(self.process.pid))

    def metrics(self) -> dict[str, float]:
        """A scrape, from FER_METRICS_PORT when the service serves its metrics there."""
        port = self.env.get("FER_METRICS_PORT") or self.port
        answer = httpx.get(f"http://{LOOPBACK_HOST}:{port}/metrics", headers=self.headers, timeout=30.0)
        answer.raise_for_status()
        return parse_metrics(answer.text)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        tree = process_tree(self.process.pid)
        for process in tree:  # each server process shuts down gracefully on SIGTERM
            with contextlib.suppress(psutil.NoSuchProcess):
                process.terminate()
        _, alive = psutil.wait_procs(tree, timeout=20)
        for process in alive:
            log.warning("process %d did not stop within 20 s of SIGTERM; killing it", process.pid)
            process.kill()
        self.process.wait()
