"""Prometheus metrics, one registry per app so several apps (tests) never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

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
            "fer_queue_depth", "Items (images, frames) waiting for the encoder", registry=r
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
