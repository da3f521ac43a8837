"""App assembly. `create_app(settings)` builds one (its model loads in the lifespan, in the background,
so /livez answers at once and /readyz says 503 until the encoders are loaded, warmed up and the default
text features exist); `service.app:app` is one built from the environment for any ASGI server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from prometheus_client import disable_created_metrics

from model.engine import create_engine
from service.access import ApiKey, RequestId
from service.errors import install_error_handlers
from service.limits import UploadLimits
from service.metrics import Metrics, RequestMetrics
from service.routes import STATIC_DIR, TAGS, router
from service.runtime import EngineFactory, Runtime
from service.settings import ServiceSettings

DOCS_ASSETS = "/docs-assets"


def create_app(
    settings: ServiceSettings,
    engine_factory: EngineFactory = create_engine,
    metrics: Metrics | None = None,
    *,
    request_ids_from_proxy: bool = False,
    address: str | None = None,
) -> FastAPI:
    """`metrics`: where the app's measurements go (default: a Prometheus registry of its own;
    service.ray_serve passes one that also reports them to Ray Serve). `request_ids_from_proxy`: behind
    Ray Serve's proxy, which chooses each request's id and answers with it (service.request_ids).
    `address`: where the server listens, for the start line (`fer serve` knows it; another server may
    not)."""
    disable_created_metrics()  # prometheus_client's *_created series (process-wide) only add noise to scrapes
    runtime = Runtime(settings, engine_factory, metrics, address)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(runtime.load(), name="fer-load")
        yield
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loading
        await runtime.close()

    # /docs with its scripts and styles from the installed package, not a CDN: it works on an
    # air-gapped host (Swagger UI's validator badge, which calls out, is off; ReDoc, whose bundle
    # fetches its logo from its CDN, is not served).
    app = FastAPIOffline(
        static_url=DOCS_ASSETS,
        redoc_url=None,
        swagger_ui_parameters={"validatorUrl": None},
        title="Zero-shot FER (Exp-CLIP)",
        version="0.1.0",
        description="Facial-expression probabilities for images and clips, and description ranking, zero-shot.",
        openapi_tags=TAGS,
        lifespan=lifespan,
        # The largest text field, /retrieve's descriptions, at its documented limits in any script:
        # JSON may spell each character as a 6-byte \uXXXX escape.
        form_limits={"max_part_size": 6 * settings.max_descriptions * (settings.max_description_chars + 8)},
    )
    app.state.runtime = runtime
    app.include_router(router)
    app.openapi = _openapi(app, settings)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    install_error_handlers(app)
    # Added innermost first: a request meets the metrics, its id, CORS, the key, then the body limits.
    app.add_middleware(
        UploadLimits,
        max_bytes=settings.max_upload_bytes,
        max_inflight_bytes=settings.max_uploads_bytes,
        timeout_s=settings.body_timeout_s,
    )
    if settings.api_key is not None:
        app.add_middleware(ApiKey, key=settings.api_key.get_secret_value())
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST"],
            allow_headers=["X-API-Key", "Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(RequestId, from_proxy=request_ids_from_proxy)
    endpoints = {route.path for route in router.routes}
    app.add_middleware(RequestMetrics, metrics=runtime.metrics, endpoints=endpoints)
    return app


def _openapi(app: FastAPI, settings: ServiceSettings) -> Callable[[], dict[str, Any]]:
    """The app's schema: FastAPI's, built from the routes, with what the routes cannot say. This app's
    limits (the settings decide them, the routes are shared), so that a request the schema allows is one
    the app takes, or, where a JSON schema cannot state them, the field's description says them; the
    content type of a part that holds JSON; and each form's name, `PredictForm` where FastAPI writes
    `Body_predict`, which a generated client takes for a class name."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        forms = schema["components"]["schemas"]
        for operations in schema["paths"].values():
            for operation in operations.values():
                body = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data")
                if body is None:
                    continue
                old = body["schema"]["$ref"].rsplit("/", 1)[1]
                new = "".join(w.capitalize() for w in operation["operationId"].split("_")) + "Form"
                form = forms[new] = forms.pop(old)
                form["title"] = new
                body["schema"]["$ref"] = f"#/components/schemas/{new}"
                fields = form["properties"]
                if "frames" in fields:
                    fields["frames"]["maximum"] = settings.max_frames
                if "descriptions" in fields:  # a JSON text (service.routes.DESCRIPTIONS)
                    body["encoding"] = {"descriptions": {"contentType": "application/json"}}
                    fields["descriptions"]["description"] += (
                        f": 1 to {settings.max_descriptions} of them, each at most "
                        f"{settings.max_description_chars} characters"
                    )
        app.openapi_schema = schema
        return schema

    return openapi


def __getattr__(name: str):
    """`service.app:app` for ASGI servers: this process's entry point, built from the environment on
    first access (not at import, so importing this module never needs a valid configuration)."""
    if name == "app":
        from service.process import configure_process

        globals()["app"] = create_app(configure_process(ServiceSettings()))
        return globals()["app"]
    raise AttributeError(name)
