"""A bounded asynchronous load generator for the service on loopback, and a /metrics reader.

Each point sends a fixed number of identical multipart uploads from `concurrency` workers over one
httpx.AsyncClient. The body is encoded once (by httpx, so it is the multipart a client sends) to keep the
generator's own CPU use low: on a small machine it shares the cores with the service it measures.
A point ends when its requests are done or its time limit passes, whichever comes first; requests still
in flight at the limit are cancelled and counted as unfinished.
"""

from __future__ import annotations

import asyncio
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
) -> LoadResult:
    """Send `requests` uploads with at most `concurrency` in flight; stop at `time_limit_s` regardless."""
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

        start = time.perf_counter()
        workers = [asyncio.create_task(worker()) for _ in range(min(concurrency, requests))]
        _, pending = await asyncio.wait(workers, timeout=time_limit_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        result.wall_s = time.perf_counter() - start
    result.unfinished = issued - result.ok - sum(result.failures.values())
    return result


def run_load(base_url: str, upload: Upload, **kwargs) -> LoadResult:
    return asyncio.run(drive(base_url, upload, **kwargs))


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
