"""`fer serve` as a child process on 127.0.0.1: started on a free port, ready when every worker
process has its model loaded (/metrics' fer_ready_processes), its memory and CPU read from /proc
(summed over its worker processes), and stopped (terminate, then kill) when the benchmark is done."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.load import LOOPBACK_HOST, parse_metrics

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK_HOST, 0))
        return sock.getsockname()[1]


def process_memory_mb(pid: int) -> dict[str, float]:
    """Resident memory now (VmRSS) and its peak (VmHWM) from /proc, in MiB; empty where there is no /proc."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    wanted = {"VmRSS:": "rss_mb", "VmHWM:": "peak_rss_mb"}
    return {
        wanted[parts[0]]: int(parts[1]) / 1024
        for parts in (line.split() for line in lines)
        if parts and parts[0] in wanted
    }


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time the process has used (/proc/<pid>/stat), or None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, from /proc (`fer serve --workers N` is a supervisor and N workers)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    tree, frontier = [pid], {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        tree += sorted(frontier)
    return tree


def tree_memory_mb(pid: int) -> dict[str, float]:
    """`process_memory_mb` summed over the process tree; the summed peaks bound the tree's peak."""
    readings = [process_memory_mb(p) for p in process_tree(pid)]
    return (
        {key: sum(r.get(key, 0.0) for r in readings) for key in ("rss_mb", "peak_rss_mb")}
        if readings[0]
        else {}
    )


def tree_cpu_seconds(pid: int) -> float | None:
    """`process_cpu_seconds` summed over the process tree (None where `pid` cannot be read)."""
    readings = [process_cpu_seconds(p) for p in process_tree(pid)]
    return None if readings[0] is None else sum(r for r in readings if r is not None)


class Service:
    """One service process with the given FER_* settings; use as a context manager."""

    def __init__(self, env: dict[str, str], log_path: Path, ready_timeout_s: float = 600.0):
        self.env = env
        self.workers = int(env.get("FER_WORKERS", "1"))  # set by the caller, not inherited (see bench.run)
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.port = free_port()
        self.base_url = f"http://{LOOPBACK_HOST}:{self.port}"
        self.process: subprocess.Popen | None = None

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
        log.info(
            "starting %s with %s", " ".join(command[1:]), " ".join(f"{k}={v}" for k, v in self.env.items())
        )
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                command,
                # Not a caller's PROMETHEUS_MULTIPROC_DIR: two services would share one set of metrics.
                env={**{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}, **self.env},
                cwd=REPO_ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

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

    def memory_mb(self) -> dict[str, float]:
        return tree_memory_mb(self.process.pid)

    def cpu_seconds(self) -> float | None:
        return tree_cpu_seconds(self.process.pid)

    def metrics(self) -> dict[str, float]:
        answer = httpx.get(f"{self.base_url}/metrics", timeout=30.0)
        answer.raise_for_status()
        return parse_metrics(answer.text)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # uvicorn's supervisor stops its workers on the way out
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            log.warning("the service did not stop within 20 s of SIGTERM; killing it and its workers")
            for pid in reversed(process_tree(self.process.pid)):  # workers first, so none is orphaned
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.process.wait()
