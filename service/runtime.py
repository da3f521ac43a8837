"""The service's state and lifecycle: the engine, the face detector, the batcher, admission and the
decode pool, loaded in the background at start-up (so /livez answers at once) and closed at shutdown."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import torch

from model.engine import FerEngine, create_engine
from model.faces.base import FaceDetector
from model.faces.factory import create_detector
from model.pipeline import FrameWorkers
from model.projection import ProjectionError
from model.prompts import CLASS_PRESETS, DEFAULT_CLASSES, DEFAULT_PROMPTS, PROMPT_SETS, LabelError
from model.registry import MissingWeights
from model.threads import pin_torch_threads
from service.admission import IMAGE, TEXT, Admission
from service.batcher import Batcher, BatchStats
from service.errors import NotReady
from service.metrics import Metrics
from service.settings import ServiceSettings

log = logging.getLogger(__name__)

EngineFactory = Callable[[ServiceSettings], FerEngine]
WARMUP_ITEMS = 4


@dataclass(frozen=True)
class Loaded:
    """The loaded model as one request uses it, taken once when the request starts (`require`)."""

    engine: FerEngine
    batcher: Batcher
    detector: FaceDetector | None


class Runtime:
    """Everything a request needs, kept on `app.state.runtime`. `metrics`: where the service's
    measurements go (default: its own Prometheus registry; service.ray_serve passes one that also
    reports to Ray)."""

    def __init__(
        self,
        settings: ServiceSettings,
        engine_factory: EngineFactory = create_engine,
        metrics: Metrics | None = None,
        address: str | None = None,
    ):
        self.settings = settings
        self.address = address  # where the server listens, for the start line
        self.engine_factory = engine_factory
        self.metrics = metrics or Metrics()
        self.admission = Admission(
            settings.max_queue,
            request_share=settings.max_request_items,
            video_share=settings.video_share,
            text_share=settings.text_share,
            on_depth=self.metrics.queue_depth.set,
            on_refused=self.metrics.refuse,
        )
        self.engine: FerEngine | None = None
        self.detector: FaceDetector | None = None
        self.batcher: Batcher | None = None
        self.load_error: str | None = None
        # Decoding, face detection and scoring: each thread on one torch thread, for the reason in
        # service.process. Videos decode in a pool of their own, so a run of long clips cannot keep images
        # waiting for a decode thread. Their frames' faces are searched in the decode pool, a short task
        # each, so that one clip uses every core, with no more frames queued there than it has threads.
        threads = settings.with_threads(torch.get_num_threads())
        self.decode_pool = ThreadPoolExecutor(
            threads.decode_workers, "fer-decode", initializer=pin_torch_threads, initargs=(1,)
        )
        self.frame_workers = FrameWorkers.sharing(self.decode_pool, threads.decode_workers)
        self.video_pool = ThreadPoolExecutor(
            threads.video_decode_workers, "fer-video", initializer=pin_torch_threads, initargs=(1,)
        )

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.batcher is not None

    def require(self) -> Loaded:
        if not self.ready:
            raise NotReady(
                self.load_error or "the model is still loading; retry when GET /readyz answers 200"
            )
        return Loaded(self.engine, self.batcher, self.detector)

    async def offload(self, fn, *args, pool: ThreadPoolExecutor | None = None, **kwargs):
        """Blocking CPU work (decode, face detection, preprocessing, scoring) off the event loop, in the
        request's context (its id reaches the log lines written there)."""
        call = partial(contextvars.copy_context().run, partial(fn, *args, **kwargs))
        return await asyncio.get_running_loop().run_in_executor(pool or self.decode_pool, call)

    def batch_stats(self, engine: FerEngine) -> BatchStats:
        """The batcher's measurements, to the metrics and to admission's wait estimates."""
        metrics = self.metrics.batch_stats(_device_peak_bytes(engine.device))

        def on_batch(items: int, seconds: float) -> None:
            metrics.on_batch(items, seconds)
            self.admission.observe(IMAGE, items, seconds)

        def on_task(items: int, seconds: float) -> None:
            metrics.on_task(items, seconds)
            self.admission.observe(TEXT, items, seconds)

        return BatchStats(on_batch=on_batch, on_task=on_task, on_wait=metrics.on_wait)

    async def load(self) -> None:
        batcher = None
        started = time.perf_counter()
        try:
            s = self.settings
            engine = await self.offload(self.engine_factory, s)
            self.detector = await self.offload(create_detector, s.face_detector, s.face_threshold)
            batcher = Batcher(
                engine.encode_pixels,
                max_batch=s.max_batch,
                max_wait_ms=s.max_wait_ms,
                stats=self.batch_stats(engine),
                threads=s.device_threads,
            )
            batcher.start()
            warmup = torch.zeros(
                min(WARMUP_ITEMS, s.max_batch), 3, engine.image_size, engine.image_size, dtype=torch.uint8
            )
            await batcher.submit(warmup)
            await batcher.run(_default_text_features, engine)
            self.engine, self.batcher = engine, batcher
            self.metrics.ready.set(1)
            log.info(
                "ready: model %s on %s (%s), face detector %s, loaded in %.1f s%s%s",
                engine.name,
                engine.device,
                engine.dtype_name + ("" if engine.backend == "torch" else f", {engine.backend}"),
                self.detector.name if self.detector else "none",
                time.perf_counter() - started,
                f"; answering at {self.address}" if self.address else "",
                f"; {engine.warning}" if engine.warning else "",
            )
        except Exception as exc:
            log.exception("the model failed to load")
            # The project's own errors say what to do (download a preset, fix a path); a library's
            # text stays in the log.
            own = isinstance(exc, MissingWeights | ProjectionError | LabelError)
            self.load_error = f"the model failed to load: {exc if own else 'see the server log'}"
        finally:
            if batcher is not None and self.batcher is not batcher:  # a failed or cancelled warm-up
                await batcher.stop()

    async def close(self) -> None:
        if self.batcher:
            await self.batcher.stop()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.video_pool.shutdown(wait=False, cancel_futures=True)


def _default_text_features(engine: FerEngine) -> None:
    """Every prompt set of the default classes, and the other class presets with the default prompts."""
    default = CLASS_PRESETS[DEFAULT_CLASSES]
    for prompt_set in PROMPT_SETS:
        engine.class_features(default, prompt_set)
    for classes in dict.fromkeys(CLASS_PRESETS.values()):  # datasets' presets repeat the basic lists
        if classes != default:
            engine.class_features(classes, DEFAULT_PROMPTS)


def _device_peak_bytes(device: torch.device):
    """How to read a GPU's peak allocation (None on a CPU: RSS tells that story)."""
    if device.type != "cuda":
        return None
    return lambda: torch.cuda.max_memory_allocated(device)
