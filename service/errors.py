"""Every failure becomes a JSON body `{"error": code, "detail": sentence}`; no traceback reaches a client.

Domain exceptions (bad media, bad labels, queue full, ...) are raised where they happen and mapped to
status codes here, in one table.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model.media import MediaError, MediaTooLarge, WrongMediaKind
from model.prompts import LabelError
from service.admission import QueueFull, TooLarge
from service.batcher import BatchFailed, ClientGone

log = logging.getLogger(__name__)


class UnsupportedMediaType(Exception):
    """The upload's declared type is not one this endpoint takes."""


class InvalidField(ValueError):
    """A form field with a bad value (the message names the field)."""


class NotReady(Exception):
    """The model is still loading (or failed to load)."""


# exception class -> (status, error code). Starlette picks a handler by the exception's MRO, so a
# subclass (MediaTooLarge) gets its own entry whatever the order here.
ERROR_TABLE: list[tuple[type[Exception], int, str]] = [
    (MediaTooLarge, 413, "media_too_large"),
    (TooLarge, 413, "too_many_items"),
    (MediaError, 400, "undecodable_media"),
    (UnsupportedMediaType, 415, "unsupported_media_type"),
    (LabelError, 422, "invalid_field"),
    (InvalidField, 422, "invalid_field"),
    (NotReady, 503, "not_ready"),
    (BatchFailed, 500, "inference_failed"),
    (ClientGone, 499, "client_closed_request"),
]


def error_body(code: str, detail: str) -> dict:
    return {"error": code, "detail": detail}


# Where a file of the other kind belongs, said in the service's terms.
OTHER_ENDPOINT = {"video": "POST /predict-video", "image": "POST /predict"}


def install_error_handlers(app: FastAPI) -> None:
    for exc_class, status, code in ERROR_TABLE:
        app.add_exception_handler(exc_class, _handler(status, code))

    @app.exception_handler(WrongMediaKind)
    async def _wrong_kind(_: Request, exc: WrongMediaKind) -> JSONResponse:
        return JSONResponse(
            error_body("wrong_endpoint", f"{exc}: send it to {OTHER_ENDPOINT[exc.kind]}"), 400
        )

    @app.exception_handler(QueueFull)
    async def _queue_full(_: Request, exc: QueueFull) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)}
        return JSONResponse(error_body("queue_full", str(exc)), 429, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return JSONResponse(error_body("invalid_field", f"{where}: {first.get('msg', 'invalid')}"), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal_error", "the server failed to handle this request"), 500)


def _handler(status: int, code: str):
    async def handle(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(code, str(exc)), status)

    return handle


class UploadLimit:
    """ASGI middleware: refuses a body over `max_bytes` while it streams in (413), from Content-Length
    when the client sends one, else by counting chunks, so an oversized upload is never read whole."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received, exceeded, started = 0, False, False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's own answer to the broken body is replaced by the 413 below
            started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        mb = self.max_bytes / (1024 * 1024)
        body = json.dumps(error_body("upload_too_large", f"the upload is over the {mb:g} MB limit")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass
