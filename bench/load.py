"""A bounded asynchronous load generator for the service on loopback, and a /metrics reader.

Each point sends a fixed number of identical multipart uploads from `concurrency` workers over one
httpx.AsyncClient. The body is encoded once (by httpx, so it is the multipart a client sends) to keep the
generator's own CPU use low: on a small machine it shares the cores with the service it measures.
A point ends when its requests are done or its time limit passes, whichever comes first; requests still
in flight at the limit are cancelled and counted as unfinished. One Python client process tops out at a
few hundred requests/s (httpx costs about 2 ms of CPU a request), below what a GPU serves, so a point
can be split across client processes that start together and whose results are merged.
"""

from __future__ import annotations

import asyncio
import multiprocessing
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
    timings: list[dict] = field(default_factory=list)  # the `timing` object of each successful response
    unfinished: int = 0  # in flight when the time limit cancelled them
    wall_s: float = 0.0
    ended: float = 0.0  # time.monotonic() at the end: the same clock in every process on one machine
    client_cpu_s: float = 0.0  # CPU the client process(es) used while driving: the generator's own cost

    @property
    def ok(self) -> int:
        return len(self.latencies_s)

    @property
    def throughput(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def complete(self) -> bool:
        return self.ok + sum(self.failures.values()) == self.requested


def check_loopback(base_url: str) -> None:
    host = urlsplit(base_url).hostname
    if host != LOOPBACK_HOST:
        raise ValueError(f"the load generator only targets {LOOPBACK_HOST}, not {host!r}")


async def drive(
    base_url: str,
    upload: Upload,
    *,
    concurrency: int,
    requests: int,
    time_limit_s: float,
    timeout_s: float = 300.0,
    transport: httpx.AsyncBaseTransport | None = None,
    start_at: float | None = None,
) -> LoadResult:
    """Send `requests` uploads with at most `concurrency` in flight; stop at `time_limit_s` regardless.
    `start_at` (a time.monotonic() value) lines up client processes; the wall time counts from it."""
    check_loopback(base_url)
    if concurrency < 1 or requests < 1 or time_limit_s <= 0:
        raise ValueError("concurrency and requests must be at least 1 and the time limit positive")
    result = LoadResult(concurrency, requests)
    issued = 0
    headers = {"content-type": upload.content_type}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=base_url, transport=transport, timeout=timeout_s, limits=limits
    ) as client:

        async def worker() -> None:
            nonlocal issued
            while issued < requests:
                issued += 1
                start = time.perf_counter()
                try:
                    response = await client.post(upload.path, content=upload.body, headers=headers)
                except httpx.HTTPError as exc:
                    result.failures[type(exc).__name__] += 1
                    continue
                if response.status_code != 200:
                    result.failures[str(response.status_code)] += 1
                    continue
                result.latencies_s.append(time.perf_counter() - start)
                timing = response.json().get("timing")
                if isinstance(timing, dict):
                    result.timings.append(timing)

        if start_at is not None:
            await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        start = time.monotonic() if start_at is None else start_at
        cpu = time.process_time()
        workers = [asyncio.create_task(worker()) for _ in range(min(concurrency, requests))]
        _, pending = await asyncio.wait(workers, timeout=time_limit_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        result.ended = time.monotonic()
        result.client_cpu_s = time.process_time() - cpu
        result.wall_s = result.ended - start
    result.unfinished = issued - result.ok - sum(result.failures.values())
    return result


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` as `parts` integers that differ by at most one, larger first (zeros dropped)."""
    shares = [total // parts + (1 if i < total % parts else 0) for i in range(parts)]
    return [share for share in shares if share]


def run_load(base_url: str, upload: Upload, *, processes: int = 1, **kwargs) -> LoadResult:
    """`drive` in this process, or with its workers and requests split across `processes` clients."""
    shares = split_evenly(kwargs["concurrency"], processes)
    if len(shares) == 1:
        return asyncio.run(drive(base_url, upload, **kwargs))
    counts = split_evenly(kwargs["requests"], len(shares))
    # spawn: forking a process that holds torch's thread pools can deadlock the child.
    with multiprocessing.get_context("spawn").Pool(len(shares)) as pool:
        pool.starmap(time.monotonic, [()] * len(shares))  # children started, imports done
        start_at = time.monotonic() + 0.5
        jobs = [
            (base_url, upload, {**kwargs, "concurrency": c, "requests": r, "start_at": start_at})
            for c, r in zip(shares, counts, strict=False)
        ]
        results = pool.starmap(_drive_in_child, jobs)
    return merge_results(results, start_at)


def _drive_in_child(base_url: str, upload: Upload, kwargs: dict) -> LoadResult:
    return asyncio.run(drive(base_url, upload, **kwargs))


def merge_results(results: list[LoadResult], start_at: float) -> LoadResult:
    merged = LoadResult(sum(r.concurrency for r in results), sum(r.requested for r in results))
    for r in results:
        merged.latencies_s += r.latencies_s
        merged.failures += r.failures
        merged.timings += r.timings
        merged.unfinished += r.unfinished
        merged.client_cpu_s += r.client_cpu_s
    merged.ended = max(r.ended for r in results)
    merged.wall_s = merged.ended - start_at
    return merged


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name: value summed over label sets}, e.g. `fer_batch_size_sum`."""
    totals: Counter = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels.get("le") and not sample.labels.get("quantile"):
                totals[sample.name] += sample.value
    return dict(totals)


def metric_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: value - before.get(name, 0.0) for name, value in after.items()}
