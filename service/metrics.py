"""Prometheus metrics, one registry per app so several apps in one process (tests) never collide.

With several server processes (`fer serve --workers N`) each process counts its own requests and
batches, and /metrics is answered by whichever process takes the connection: `fer serve` then gives
the workers prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, read when
prometheus_client is imported), and every scrape sums the processes' files: counters and histograms
over every process that has run, gauges (queue depth, ready) over the live ones."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.batcher import BatchStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class Family:
    """A counter or a histogram, as plain data: this module builds the Prometheus metric from it, and
    service.ray_serve a Ray Serve metric alike."""

    name: str
    documentation: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None  # a histogram's upper bounds; None: a counter


REQUESTS = Family("fer_requests", "Requests by endpoint and status", ("endpoint", "status"))
LATENCY = Family("fer_request_seconds", "Request latency", ("endpoint", "status"), LATENCY_BUCKETS)
REFUSED = Family(
    "fer_refused", "Requests refused by admission, by reason (queue_full, video_full, ...)", ("reason",)
)
BATCH_SIZE = Family("fer_batch_size", "Items per encoder call", buckets=BATCH_BUCKETS)
QUEUE_WAIT = Family(
    "fer_queue_wait_seconds", "Time a job waited before its first encoder call", buckets=LATENCY_BUCKETS
)
MODEL_TIME = Family("fer_model_seconds", "Time of one encoder call", buckets=LATENCY_BUCKETS)
TEXT_TIME = Family(
    "fer_text_seconds", "Time of one text-encoding task on the device", buckets=LATENCY_BUCKETS
)
RECORDED = (REQUESTS, LATENCY, REFUSED, BATCH_SIZE, QUEUE_WAIT, MODEL_TIME, TEXT_TIME)


class Metrics:
    """The service's measurements. Every counter increment and histogram observation goes through
    `record`: a subclass that also sends them elsewhere overrides it (service.ray_serve's, to Ray
    Serve). Gauges are set here and read from `registry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._recorded = {
            f: Counter(f.name, f.documentation, f.labels, registry=r)
            if f.buckets is None
            else Histogram(f.name, f.documentation, f.labels, buckets=f.buckets, registry=r)
            for f in RECORDED
        }
        self.queue_depth = Gauge(
            "fer_queue_depth",
            "Items (images, frames, texts) admitted and not yet answered",
            registry=r,
            multiprocess_mode="livesum",  # several processes: their queues added up
        )
        self.ready = Gauge(
            "fer_ready_processes",
            "Server processes whose model is loaded and warm (1 per ready process, summed over workers)",
            registry=r,
            multiprocess_mode="livesum",
        )

    def record(self, family: Family, value: float, *labels: str) -> None:
        """A counter's increment by `value`, or a histogram's observation of it; `labels` in the order
        of `family.labels`."""
        metric = self._recorded[family]
        if labels:
            metric = metric.labels(*labels)
        if family.buckets is None:
            metric.inc(value)
        else:
            metric.observe(value)

    def batch_stats(self, device_peak_bytes: Callable[[], int] | None = None) -> BatchStats:
        """The batcher's hooks. `device_peak_bytes` (a GPU's peak allocation, read after each encoder
        call) adds fer_device_peak_bytes; a CPU service has no such gauge rather than a 0."""
        peak = None
        if device_peak_bytes is not None:
            peak = Gauge(
                "fer_device_peak_bytes",
                "Peak device memory torch has allocated (summed over worker processes)",
                registry=self.registry,
                multiprocess_mode="livesum",
            )

        def on_batch(size: int, seconds: float) -> None:
            self.record(BATCH_SIZE, size)
            self.record(MODEL_TIME, seconds)
            if peak is not None:
                peak.set(device_peak_bytes())

        return BatchStats(
            on_batch=on_batch,
            on_task=lambda items, seconds: self.record(TEXT_TIME, seconds),
            on_wait=lambda seconds: self.record(QUEUE_WAIT, seconds),
        )

    def refuse(self, reason: str) -> None:
        self.record(REFUSED, 1, reason)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.record(REQUESTS, 1, endpoint, str(status))
        self.record(LATENCY, seconds, endpoint, str(status))

    def exposition(self) -> bytes:
        """The text a scrape gets: this app's registry, or every server process's metrics summed."""
        return generate_latest(scraped(self.registry))


class LiveProcesses(multiprocess.MultiProcessCollector):
    """Every server process's metrics summed, with the gauges of processes that have exited dropped
    first (however they ended: a crash, the OOM killer, uvicorn's restart)."""

    def collect(self):
        for path in Path(self._path).glob("gauge_live*_*.db"):
            pid = int(path.stem.rsplit("_", 1)[1])
            if not _alive(pid):
                multiprocess.mark_process_dead(pid, self._path)
        return super().collect()


def scraped(own: CollectorRegistry) -> CollectorRegistry:
    """What a scrape reads: `own` (one process), or all server processes' in multiprocess mode."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return own
    registry = CollectorRegistry()
    LiveProcesses(registry, directory)
    return registry


def serve_metrics(host: str, port: int, own: CollectorRegistry | None = None) -> None:
    """/metrics on a port of its own (FER_METRICS_PORT), in a background thread of this process."""
    start_http_server(port, addr=host, registry=scraped(own or CollectorRegistry()))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class RequestMetrics:
    """ASGI middleware: counts and times every request by endpoint and status (413s included)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, endpoints: set[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        except asyncio.CancelledError:  # the server dropped the request (the client left): no answer
            if status == 500:
                status = 499
            raise
        finally:
            endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
            self.metrics.observe_request(endpoint, status, time.perf_counter() - started)
