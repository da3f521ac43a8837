"""The FastAPI app. `create_app()` builds one; `app` is one built from the environment, for any ASGI
server (`uvicorn service.app:app`). Models load in the lifespan, in the background, so /livez answers
at once and /readyz says 503 until the encoders are loaded, warmed up and the default text features exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import torch
from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model.engine import FerEngine
from model.prompts import CLASS_PRESETS, DEFAULT_CLASSES, DEFAULT_PROMPTS, PROMPT_SETS
from service.batcher import Batcher, pin_torch_threads
from service.config import ServiceSettings
from service.errors import NotReady, UploadLimit, install_error_handlers
from service.metrics import Metrics

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"

EngineFactory = Callable[[ServiceSettings], FerEngine]
WARMUP_ITEMS = 4


class Runtime:
    """Everything a request needs, kept on `app.state.runtime`."""

    def __init__(self, settings: ServiceSettings, engine_factory: EngineFactory):
        self.settings = settings
        self.engine_factory = engine_factory
        self.metrics = Metrics()
        self.engine: FerEngine | None = None
        self.batcher: Batcher | None = None
        self.load_error: str | None = None
        # torch's intra-op threads: all of them for the batcher's device thread, one for every other
        # thread (this pool, the event loop). Each thread that runs an OpenMP-parallel op keeps a team of
        # its own, and once teams outnumber the cores libgomp stops spin-waiting between ops, so every op
        # of an encoder call pays a wake-up: ViT-B/32 in bfloat16 at batch 1 on 2 cores took 28 ms a
        # call instead of 19 (a one-off timing, commit a327c34; not in the repository). Read here,
        # before any thread below has changed the count.
        self.device_threads = torch.get_num_threads()
        self.loop_threads: int | None = None
        self.decode_pool = ThreadPoolExecutor(
            settings.decode_workers,
            thread_name_prefix="fer-decode",
            initializer=pin_torch_threads,
            initargs=(1,),
        )

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.batcher is not None

    def require(self) -> tuple[FerEngine, Batcher]:
        if not self.ready:
            raise NotReady(
                self.load_error or "the model is still loading; retry when GET /readyz answers 200"
            )
        return self.engine, self.batcher

    async def offload(self, fn, *args):
        """Runs blocking CPU work (decode, face detection, preprocessing, scoring) off the event loop,
        single-threaded for torch; text encoding goes to the device thread (`class_features`)."""
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, partial(fn, *args))

    async def class_features(self, classes: tuple[str, ...], prompt_set: str) -> torch.Tensor:
        """A class list's text features: from the cache, else encoded on the device thread. Scoring
        gets the tensor itself, so an eviction in between cannot make the pool encode it again."""
        engine, batcher = self.require()
        text = engine.cached_class_features(classes, prompt_set)
        if text is None:
            texts = len(classes) * len(PROMPT_SETS[prompt_set])
            text = await batcher.run(engine.class_features, classes, prompt_set, items=texts)
        return text

    async def prepare_and_encode(self, request, prepare, *args):
        """The shared path of every inference endpoint: `prepare(engine, *args)` in the thread pool
        (announced to the batcher, so it may wait for this request's items), then one trip through
        the batcher. Returns (prepared, features, time decoding ended)."""
        engine, batcher = self.require()
        withdraw = batcher.expect()
        try:
            prepared = await self.offload(prepare, engine, *args)
        finally:
            withdraw()
        decoded = time.perf_counter()
        features = await batcher.submit(prepared.pixels, request.is_disconnected)
        return prepared, features, decoded

    async def load(self) -> None:
        batcher = None
        self.loop_threads = torch.get_num_threads()  # given back at close: the thread may not be ours
        pin_torch_threads(1)  # the event loop's thread (see __init__)
        try:
            engine = await self.offload(self.engine_factory, self.settings)
            s = self.settings
            batcher = Batcher(
                engine.encode_pixels,
                max_batch=s.max_batch,
                max_wait_ms=s.max_wait_ms,
                max_queue=s.max_queue,
                stats=self.metrics.batch_stats(_device_peak_bytes(engine.device)),
                threads=self.device_threads,
            )
            batcher.start()
            warmup = torch.zeros(
                min(WARMUP_ITEMS, s.max_batch), 3, engine.image_size, engine.image_size, dtype=torch.uint8
            )
            await batcher.submit(warmup)
            await batcher.run(self._default_text_features, engine)
            self.engine, self.batcher = engine, batcher
            self.metrics.ready.set(1)
            log.info("model %s ready on %s in %s", engine.name, engine.device, engine.dtype)
        except Exception as exc:
            self.load_error = f"the model failed to load: {exc}"
            log.error("%s", self.load_error)
            if batcher is not None:  # a failed warm-up: don't leave its task and thread running
                await batcher.stop()

    @staticmethod
    def _default_text_features(engine: FerEngine) -> None:
        for prompt_set in PROMPT_SETS:
            engine.class_features(CLASS_PRESETS[DEFAULT_CLASSES], prompt_set)
        for preset in ("basic8", "all11"):
            engine.class_features(CLASS_PRESETS[preset], DEFAULT_PROMPTS)

    async def close(self) -> None:
        if self.batcher:
            await self.batcher.stop()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        if self.loop_threads:
            torch.set_num_threads(self.loop_threads)


def _device_peak_bytes(device: torch.device):
    """How to read a GPU's peak allocation (None on a CPU: RSS tells that story)."""
    if device.type != "cuda":
        return None
    return lambda: torch.cuda.max_memory_allocated(device)


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
        finally:
            endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
            self.metrics.observe_request(endpoint, status, time.perf_counter() - started)


def create_app(
    settings: ServiceSettings | None = None, engine_factory: EngineFactory | None = None
) -> FastAPI:
    settings = settings or ServiceSettings()
    runtime = Runtime(settings, engine_factory or FerEngine.from_settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(runtime.load(), name="fer-load")
        yield
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loading
        await runtime.close()

    from service.routes import router

    app = FastAPI(
        title="Zero-shot FER (Exp-CLIP)",
        version="0.1.0",
        description="Facial-expression probabilities for images and clips, and description ranking, zero-shot.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    install_error_handlers(app)
    app.add_middleware(UploadLimit, max_bytes=settings.max_upload_bytes)
    endpoints = {route.path for route in router.routes}
    app.add_middleware(RequestMetrics, metrics=runtime.metrics, endpoints=endpoints)
    return app


def __getattr__(name: str):
    """`service.app:app` for ASGI servers, built from the environment on first access (not at import,
    so importing this module never needs a valid configuration)."""
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(name)
