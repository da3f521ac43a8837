"""Prometheus metrics, one registry per app so several apps (tests) never collide.

With several server processes (`fer serve --workers N`) each process counts its own requests and
batches, and /metrics is answered by whichever process takes the connection: `fer serve` then gives
the workers prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, read when
prometheus_client is imported), and every scrape reports the live processes' metrics summed."""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

from service.batcher import BatchStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
disable_created_metrics()  # the *_created series only add noise to scrapes

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "fer_requests", "Requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "fer_request_seconds",
            "Request latency",
            ["endpoint", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "fer_queue_depth",
            "Items (images, frames) waiting for the encoder",
            registry=r,
            multiprocess_mode="livesum",  # several processes: their queues added up
        )
        self.ready = Gauge(
            "fer_ready_processes",
            "Server processes whose model is loaded and warm (1 per ready process, summed over workers)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.batch_size = Histogram(
            "fer_batch_size", "Items per encoder call", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "fer_queue_wait_seconds",
            "Time a job waited before its first encoder call",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_time = Histogram(
            "fer_model_seconds", "Time of one encoder call", buckets=LATENCY_BUCKETS, registry=r
        )

    def batch_stats(self) -> BatchStats:
        def on_batch(size: int, seconds: float) -> None:
            self.batch_size.observe(size)
            self.model_time.observe(seconds)

        return BatchStats(on_batch=on_batch, on_wait=self.queue_wait.observe, on_depth=self.queue_depth.set)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint, str(status)).observe(seconds)

    def exposition(self) -> bytes:
        """The text a scrape gets: this app's registry, or every live server process's metrics summed."""
        if not multiprocess_dir():
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    @staticmethod
    def process_exiting() -> None:
        """Drops this process's queue-depth gauge from the multiprocess sums (no-op in one process)."""
        if multiprocess_dir():
            multiprocess.mark_process_dead(os.getpid())


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")
