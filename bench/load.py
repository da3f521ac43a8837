"""A bounded load generator for the service on loopback, and a /metrics reader.

A point sends a fixed number of identical multipart uploads (encoded once) with at most `concurrency` in
flight on keep-alive connections, and ends when they are done or its time limit passes; requests still
in flight then are cancelled and counted as unfinished. A GPU can outrun one client process, so a
point can be split across client processes whose results are merged.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

LOOPBACK_HOST = "127.0.0.1"


@dataclass(frozen=True)
class Upload:
    """One prepared request: a path and a multipart body with its content type."""

    path: str
    body: bytes
    content_type: str

    @classmethod
    def multipart(
        cls, path: str, filename: str, data: bytes, media_type: str, fields: dict[str, str] | None = None
    ) -> Upload:
        request = httpx.Request(
            "POST", f"http://{LOOPBACK_HOST}{path}", files={"file": (filename, data, media_type)}, data=fields
        )
        return cls(path, request.read(), request.headers["content-type"])


@dataclass
class LoadResult:
    concurrency: int
    requested: int
    latencies_s: list[float] = field(default_factory=list)  # successful requests only
    failures: Counter = field(default_factory=Counter)  # HTTP status or exception name -> count
    timings: list[dict] = field(default_factory=list)  # the `timing` object of each successful answer
    unfinished: int = 0  # in flight when the time limit cancelled them
    wall_s: float = 0.0
    client_cpu_s: float = 0.0  # CPU the client process(es) used: the generator's own cost
    client_pids: list[int] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return len(self.latencies_s)

    @property
    def throughput(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0


def check_loopback(base_url: str) -> None:
    host = urlsplit(base_url).hostname
    if host != LOOPBACK_HOST:
        raise ValueError(f"the load generator only targets {LOOPBACK_HOST}, not {host!r}")


async def drive(
    base_url: str, upload: Upload, *, concurrency: int, requests: int, time_limit_s: float
) -> LoadResult:
    """Send `requests` uploads with at most `concurrency` in flight; stop at `time_limit_s` regardless."""
    check_loopback(base_url)
    if concurrency < 1 or requests < 1 or time_limit_s <= 0:
        raise ValueError("concurrency and requests must be at least 1 and the time limit positive")
    result = LoadResult(concurrency, requests, client_pids=[os.getpid()])
    issued = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"content-type": upload.content_type}
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=time_limit_s) as client:

        async def worker() -> None:
            nonlocal issued
            while issued < requests:
                issued += 1
                start = time.perf_counter()
                try:
                    answer = await client.post(upload.path, content=upload.body, headers=headers)
                except httpx.HTTPError as exc:
                    result.failures[type(exc).__name__] += 1
                    continue
                if answer.status_code != 200:
                    result.failures[str(answer.status_code)] += 1
                    continue
                result.latencies_s.append(time.perf_counter() - start)
                result.timings.append(json.loads(answer.content).get("timing", {}))

        cpu, started = time.process_time(), time.perf_counter()
        tasks = [asyncio.create_task(worker()) for _ in range(min(concurrency, requests))]
        _, pending = await asyncio.wait(tasks, timeout=time_limit_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        result.wall_s = time.perf_counter() - started
        result.client_cpu_s = time.process_time() - cpu
    result.unfinished = requests - result.ok - sum(result.failures.values())
    return result


def _drive_in_process(args: tuple) -> LoadResult:
    base_url, upload, concurrency, requests, time_limit_s = args
    return asyncio.run(
        drive(base_url, upload, concurrency=concurrency, requests=requests, time_limit_s=time_limit_s)
    )


def split_evenly(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def run_load(
    base_url: str, upload: Upload, *, concurrency: int, requests: int, time_limit_s: float, processes: int = 1
) -> LoadResult:
    """One load point, driven by `processes` client processes (at most one per worker) merged into one
    result; the wall time is the slowest process's."""
    processes = max(1, min(processes, concurrency, requests))
    if processes == 1:
        return _drive_in_process((base_url, upload, concurrency, requests, time_limit_s))
    shares = zip(split_evenly(concurrency, processes), split_evenly(requests, processes), strict=True)
    jobs = [(base_url, upload, c, r, time_limit_s) for c, r in shares]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        parts = pool.map(_drive_in_process, jobs)
    merged = LoadResult(concurrency, requests)
    for part in parts:
        merged.latencies_s += part.latencies_s
        merged.failures += part.failures
        merged.timings += part.timings
        merged.unfinished += part.unfinished
        merged.client_cpu_s += part.client_cpu_s
        merged.client_pids += part.client_pids
        merged.wall_s = max(merged.wall_s, part.wall_s)
    return merged


def parse_metrics(text: str) -> dict[str, float]:
    """A Prometheus scrape -> {sample name: value summed over its labels}."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def metric_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: value - before.get(name, 0.0) for name, value in after.items()}
