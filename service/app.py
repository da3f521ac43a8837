"""App assembly. `create_app(settings)` builds one (its model loads in the lifespan, in the background,
so /livez answers at once and /readyz says 503 until the encoders are loaded, warmed up and the default
text features exist); `service.app:app` is one built from the environment for any ASGI server."""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from model.engine import create_engine
from service.errors import UploadLimit, install_error_handlers
from service.metrics import RequestMetrics
from service.routes import STATIC_DIR, router
from service.runtime import EngineFactory, Runtime
from service.settings import ServiceSettings


def create_app(settings: ServiceSettings, engine_factory: EngineFactory = create_engine) -> FastAPI:
    runtime = Runtime(settings, engine_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(runtime.load(), name="fer-load")
        yield
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loading
        await runtime.close()

    app = FastAPI(
        title="Zero-shot FER (Exp-CLIP)",
        version="0.1.0",
        description="Facial-expression probabilities for images and clips, and description ranking, zero-shot.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    install_error_handlers(app)
    app.add_middleware(UploadLimit, max_bytes=settings.max_upload_bytes)
    endpoints = {route.path for route in router.routes}
    app.add_middleware(RequestMetrics, metrics=runtime.metrics, endpoints=endpoints)
    return app


def __getattr__(name: str):
    """`service.app:app` for ASGI servers: this process's entry point, built from the environment on
    first access (not at import, so importing this module never needs a valid configuration)."""
    if name == "app":
        from service.process import configure_process

        globals()["app"] = create_app(configure_process(ServiceSettings()))
        return globals()["app"]
    raise AttributeError(name)
