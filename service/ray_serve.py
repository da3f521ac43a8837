"""The service on Ray Serve: `serve run deploy/serve.yaml`, import path `service.ray_serve:app`.

Each replica builds the same FastAPI app as `fer serve` (`service.app.create_app`), so one replica is
one engine, one batcher, one admission queue and one /metrics, exactly as one `fer serve` process; Serve
adds the proxy, the routing between replicas, autoscaling and placement on the cluster's GPUs.

A replica counts as started only when its model is loaded and warm: the app's lifespan starts the load
in the background (as under uvicorn), and the replica's first health check, which Serve awaits as part
of the replica's start-up, waits for it. A load error fails that check, and so the replica, with the
service's own message (missing weights: the `fer weights download ...` sentence).

Settings come from FER_* in the application's `runtime_env.env_vars`. The thread counts follow the CPUs
Ray gave the replica (`ray_actor_options.num_cpus`), not the node's cores, and FER_DEVICE=auto means the
GPU Ray gave the replica, if any. The fer_* metrics are also recorded through Ray Serve's metrics API, so
the node's metrics export port has them per replica (`ray_fer_*{replica=...}`). Ray is imported here
only: nothing else in the package needs it.
"""

from __future__ import annotations

import asyncio
import logging
import os

from model.threads import GOMP_SPIN_COUNT

# Read by libgomp when torch loads; the config's runtime_env sets it too, this covers `serve run` of
# the import path alone (a user's value wins).
os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPIN_COUNT)

import ray
import torch
from fastapi import FastAPI
from ray import serve
from ray.serve import metrics as serve_metrics

from model.settings import device_for, dtype_for
from service.app import create_app
from service.logs import PROJECT_LOGGERS
from service.metrics import RECORDED, Family, Metrics
from service.process import configure_process
from service.settings import ServiceSettings

log = logging.getLogger(__name__)

# Serve's default (5) would cap every batch at 5 requests; the config file sets it per deployment.
DEFAULT_MAX_ONGOING_REQUESTS = 256
LOAD_POLL_S = 0.05


def replica_cpus() -> int:
    """The CPUs Ray assigned to this replica, as Ray counts them for OMP_NUM_THREADS (floor, at least
    1): os.cpu_count() and the affinity mask show the whole node."""
    assigned = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(assigned))


def replica_settings(settings: ServiceSettings) -> ServiceSettings:
    """The settings with this replica's thread counts and device resolved, the process configured as
    `fer serve` configures its own (service.process). Explicit FER_DEVICE_THREADS / FER_DECODE_WORKERS
    win; FER_DEVICE=auto becomes the CPU, with a log line saying why, when Ray gave the replica no GPU
    (torch would otherwise see every GPU of the node and share GPU 0 with replicas that own it) or
    when the GPU it gave is not usable by torch."""
    cpus = replica_cpus()
    update: dict = {}
    if settings.device == "auto":
        gpus = ray.get_gpu_ids()
        if not gpus:
            log.warning(
                "FER_DEVICE=auto: Ray gave this replica no GPU (ray_actor_options.num_gpus is 0 or unset), "
                "so the model runs on the CPU (%d CPUs)",
                cpus,
            )
            update["device"] = "cpu"
        elif not torch.cuda.is_available():
            log.warning(
                "FER_DEVICE=auto: Ray gave this replica GPU %s but torch sees no CUDA device (driver or "
                "CUDA_VISIBLE_DEVICES?), so the model runs on the CPU (%d CPUs)",
                ",".join(map(str, gpus)),
                cpus,
            )
            update["device"] = "cpu"
    return configure_process(settings.model_copy(update=update), cpus)


def log_through_serve() -> None:
    """The project's loggers into the replica's Serve log (and its stderr), at INFO: the load and
    device messages of a replica are where `serve status` users look for them."""
    serve_logger = logging.getLogger("ray.serve")
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        for handler in serve_logger.handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        logger.propagate = False  # the root logger would print each line a second time


class RayMetrics(Metrics):
    """The app's fer_* metrics, also through Ray Serve's metrics API: Serve tags them with the
    application, deployment and replica, and the node's metrics export port serves them as ray_fer_*.

    Counters and histograms are recorded in both as they happen (`record`). Gauges are copied from the
    app's registry on each health check instead: a Ray gauge set once at start-up is not reliably
    exported, one set periodically is."""

    def __init__(self) -> None:
        super().__init__()
        self._mirrors = {family: _mirror_of(family) for family in RECORDED}
        self._gauges: dict[str, serve_metrics.Gauge] = {}

    def record(self, family: Family, value: float, *labels: str) -> None:
        super().record(family, value, *labels)
        tags = dict(zip(family.labels, labels, strict=True)) or None
        if family.buckets is None:
            self._mirrors[family].inc(value, tags=tags)
        else:
            self._mirrors[family].observe(value, tags=tags)

    def copy_gauges(self) -> None:
        for family in self.registry.collect():
            if family.type != "gauge":
                continue
            for sample in family.samples:
                gauge = self._gauges.get(family.name)
                if gauge is None:
                    gauge = serve_metrics.Gauge(
                        family.name, description=family.documentation, tag_keys=tuple(sample.labels)
                    )
                    self._gauges[family.name] = gauge
                gauge.set(sample.value, tags=dict(sample.labels) or None)


def _mirror_of(family: Family):
    """A Ray Serve metric defined as `family` is."""
    if family.buckets is None:
        return serve_metrics.Counter(family.name, description=family.documentation, tag_keys=family.labels)
    return serve_metrics.Histogram(
        family.name,
        description=family.documentation,
        boundaries=[float(b) for b in family.buckets],
        tag_keys=family.labels,
    )


# The config file (deploy/serve.yaml) overrides these, except max_constructor_retry_count, which Serve's
# config schema does not take: a replica whose weights are missing fails every try the same way.
@serve.deployment(
    name="fer", max_ongoing_requests=DEFAULT_MAX_ONGOING_REQUESTS, max_constructor_retry_count=3
)
@serve.ingress()  # late-bound: the app is built in the replica, by __serve_build_asgi_app__
class FerReplica:
    """One replica: the service's app and its runtime, configured for the resources Ray gave it."""

    async def __init__(self) -> None:
        log_through_serve()
        settings = replica_settings(ServiceSettings())
        # As `fer serve` does before it starts: missing weights or a device this replica cannot run
        # fail the replica now, with that one message, rather than in the background load.
        settings.resolve_checked()
        dtype_for(settings.dtype, device_for(settings.device, settings.backend))
        # Not `self.app`: Serve's ingress wrapper has a property of that name.
        self.metrics = RayMetrics()
        # Serve's proxy gives every request its id and answers with it: the app takes that one.
        self.fastapi = create_app(settings, metrics=self.metrics, request_ids_from_proxy=True)
        self.runtime = self.fastapi.state.runtime
        log.info(
            "replica on %s; threads: encoder %d, decode %d, video decode %d; Ray resources %s",
            settings.device,
            settings.device_threads,
            settings.decode_workers,
            settings.video_decode_workers,
            ray.get_runtime_context().get_assigned_resources(),
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self.fastapi

    async def check_health(self) -> None:
        """Serve awaits the first call as part of the replica's start-up, without its health-check
        timeout: it waits for the model, so no request is routed to a cold replica."""
        runtime = self.runtime
        while not runtime.ready and runtime.load_error is None:
            await asyncio.sleep(LOAD_POLL_S)
        if runtime.load_error is not None:
            raise RuntimeError(runtime.load_error)
        self.metrics.copy_gauges()


app = FerReplica.bind()
