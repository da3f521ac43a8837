"""A bounded asynchronous load generator for the service on loopback, and a /metrics reader.

Each point sends a fixed number of identical multipart uploads from `concurrency` workers, each on its
own keep-alive HTTP/1.1 connection. The multipart body is encoded once, by httpx (so it is what a client
sends), and each worker writes the same prepared bytes and reads the answer with asyncio streams: on a
small machine the generator shares the cores with the service it measures, and httpx's client cost
1.9 ms of CPU a request there at concurrency 32, the plain stream 0.11 ms (the benchmark report's client
cores / images/s, README).
A point ends when its requests are done or its time limit passes, whichever comes first; requests
still in flight at the limit are cancelled and counted as unfinished. A GPU can outrun one client
process, so a point can be split across client processes that start together and whose results are
merged.
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
    timings: list[dict] = field(default_factory=list)  # the `timing` object of each successful response
    unfinished: int = 0  # in flight when the time limit cancelled them
    wall_s: float = 0.0
    ended: float = 0.0  # time.monotonic() at the end: the same clock in every process on one machine
    client_cpu_s: float = 0.0  # CPU the client process(es) used while driving: the generator's own cost
    client_pids: list[int] = field(default_factory=list)  # the process(es) that drove it

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


class Connection:
    """One keep-alive HTTP/1.1 connection to the service that sends a prepared request and reads the
    answer (Content-Length or chunked body). It reconnects when the server closed it or a request failed
    half-way, so a broken connection costs one request, not the worker."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def send(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        """Writes `head` + `body`; returns (status, response body). A connection the server closed while
        it was idle (uvicorn drops idle keep-alive connections) is replaced before sending; a request
        is never sent twice, so a server that drops connections shows as failures."""
        if self._reader is not None and self._reader.at_eof():
            self.close()
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        try:
            self._writer.write(head)
            self._writer.write(body)
            await self._writer.drain()
            status, headers, keep_alive = parse_head(await self._reader.readuntil(b"\r\n\r\n"))
            while 100 <= status < 200:  # an interim answer (100 Continue, ...): the final one follows
                status, headers, keep_alive = parse_head(await self._reader.readuntil(b"\r\n\r\n"))
            if status in (204, 304):
                content = b""  # no body, whatever the headers say
            elif "chunked" in tokens(headers.get("transfer-encoding", "")):  # wins over Content-Length
                content = await self._read_chunked()
            elif "content-length" in headers:
                content = await self._reader.readexactly(int(headers["content-length"]))
            else:  # the body runs to the end of the connection
                content, keep_alive = await self._reader.read(), False
        except BaseException:
            self.close()  # half a request on the wire: the next one needs a fresh connection
            raise
        if not keep_alive:
            self.close()
        return status, content

    async def _read_chunked(self) -> bytes:
        chunks = []
        while size := int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16):
            chunks.append(await self._reader.readexactly(size))
            await self._reader.readexactly(2)  # the CRLF after each chunk
        while await self._reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields, then a blank line
            pass
        return b"".join(chunks)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def parse_head(head: bytes) -> tuple[int, dict[str, str], bool]:
    """An HTTP/1.x response head -> (status, lower-cased headers, whether the connection stays open)."""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    version, status = status_line.split(" ", 2)[:2]
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    keep_alive = version == "HTTP/1.1" and "close" not in tokens(headers.get("connection", ""))
    return int(status), headers, keep_alive


def tokens(value: str) -> set[str]:
    """A comma-separated header value's tokens, lower-cased: `Connection: keep-alive, close`."""
    return {token.strip().lower() for token in value.split(",")}


# What a request can fail with short of an HTTP error status: connection trouble or a timeout (both
# OSError), an answer that is not HTTP or not JSON (ValueError covers json.JSONDecodeError).
FAILURES = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)
CLIENT_START_TIMEOUT_S = 120.0  # a spawned client process imports the benchmark (seconds) before it drives


def request_head(upload: Upload, host: str, port: int) -> bytes:
    return (
        f"POST {upload.path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {upload.content_type}\r\n"
        f"Content-Length: {len(upload.body)}\r\n\r\n"
    ).encode("latin-1")


async def drive(
    base_url: str,
    upload: Upload,
    *,
    concurrency: int,
    requests: int,
    time_limit_s: float,
    timeout_s: float = 300.0,
    start_at: float | None = None,
) -> LoadResult:
    """Send `requests` uploads with at most `concurrency` in flight; stop at `time_limit_s` regardless.
    `start_at` (a time.monotonic() value) lines up client processes; the wall time counts from it."""
    check_loopback(base_url)
    if concurrency < 1 or requests < 1 or time_limit_s <= 0:
        raise ValueError("concurrency and requests must be at least 1 and the time limit positive")
    url = urlsplit(base_url)
    port = url.port or 80
    head = request_head(upload, url.hostname, port)
    result = LoadResult(concurrency, requests, client_pids=[os.getpid()])
    issued = 0
    connections = [Connection(url.hostname, port) for _ in range(min(concurrency, requests))]

    async def worker(connection: Connection) -> None:
        nonlocal issued
        while issued < requests:
            issued += 1
            start = time.perf_counter()
            try:
                async with asyncio.timeout(timeout_s):
                    status, content = await connection.send(head, upload.body)
                latency = time.perf_counter() - start
                if status != 200:
                    result.failures[str(status)] += 1
                    continue
                answer = json.loads(content)
            except FAILURES as exc:
                result.failures[type(exc).__name__] += 1
                continue
            result.latencies_s.append(latency)
            timing = answer.get("timing") if isinstance(answer, dict) else None
            if isinstance(timing, dict):
                result.timings.append(timing)

    if start_at is not None:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    start = time.monotonic() if start_at is None else start_at
    cpu = time.process_time()
    workers = [asyncio.create_task(worker(connection)) for connection in connections]
    try:
        done, pending = await asyncio.wait(workers, timeout=time_limit_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()  # a failure the workers don't count (a bug here) stops the benchmark loudly
        result.ended = time.monotonic()
        result.client_cpu_s = time.process_time() - cpu
        result.wall_s = result.ended - start
    finally:
        for connection in connections:
            connection.close()
    result.unfinished = issued - result.ok - sum(result.failures.values())
    return result


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` as `parts` integers that differ by at most one, larger first (zeros dropped)."""
    shares = [total // parts + (1 if i < total % parts else 0) for i in range(parts)]
    return [share for share in shares if share]


def split_load(concurrency: int, requests: int, processes: int) -> list[tuple[int, int]]:
    """(workers, requests) for each client process: the workers split evenly across the processes and
    the requests evenly across the workers, so every worker sends about as many and none idles early."""
    per_worker = split_evenly(requests, concurrency)  # the workers that have something to send
    jobs, first = [], 0
    for share in split_evenly(len(per_worker), processes):
        jobs.append((share, sum(per_worker[first : first + share])))
        first += share
    return jobs


def run_load(base_url: str, upload: Upload, *, processes: int = 1, **kwargs) -> LoadResult:
    """`drive` in this process, or with its workers and requests split across `processes` clients."""
    jobs = split_load(kwargs["concurrency"], kwargs["requests"], processes)
    if len(jobs) == 1:
        return _drive_in_child(base_url, upload, kwargs)
    # spawn: forking a process that holds torch's thread pools can deadlock the child.
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(len(jobs) + 1)
    with context.Pool(len(jobs), initializer=ready.wait) as pool:
        # Every child is up with its imports done: none starts late. A child that cannot start
        # breaks the barrier (BrokenBarrierError) instead of leaving the benchmark waiting for ever.
        ready.wait(timeout=CLIENT_START_TIMEOUT_S)
        start_at = time.monotonic() + 0.5
        # One job per child: each job lasts the whole point, so no child is free to take a second.
        results = pool.starmap(
            _drive_in_child,
            [
                (base_url, upload, {**kwargs, "concurrency": c, "requests": r, "start_at": start_at})
                for c, r in jobs
            ],
        )
    return merge_results(results, start_at)


def _drive_in_child(base_url: str, upload: Upload, kwargs: dict) -> LoadResult:
    """One client: `drive` on its own event loop (in this process, or in a pool's child)."""
    return asyncio.run(drive(base_url, upload, **kwargs))


def merge_results(results: list[LoadResult], start_at: float) -> LoadResult:
    merged = LoadResult(sum(r.concurrency for r in results), sum(r.requested for r in results))
    for r in results:
        merged.latencies_s += r.latencies_s
        merged.failures += r.failures
        merged.timings += r.timings
        merged.unfinished += r.unfinished
        merged.client_cpu_s += r.client_cpu_s
        merged.client_pids += r.client_pids
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
