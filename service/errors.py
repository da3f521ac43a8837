"""Every failure becomes a JSON body `{"error": code, "detail": sentence, "request_id": id}` in the
project's own words; a library's own error text (Pillow's, FFmpeg's, a parser's) and any traceback go to
the log under the request id, never to the client.

Domain exceptions (bad media, bad labels, queue full, ...) are raised where they happen and mapped to
status codes here, in one table.
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from model.media import DecodeStopped, MediaError, MediaTooLarge, WrongMediaKind
from model.prompts import LabelError
from service.admission import QueueFull, TooLarge
from service.batcher import BatchFailed, ClientGone

log = logging.getLogger(__name__)

REQUEST_ID: ContextVar[str | None] = ContextVar("fer_request_id", default=None)  # set by service.access


class UnsupportedMediaType(Exception):
    """The upload's declared type is not one this endpoint takes."""


class InvalidField(ValueError):
    """A form field with a bad value (the message names the field)."""


class NotFound(Exception):
    """A resource this service does not serve here (the message says where it is)."""


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
    (NotFound, 404, "not_found"),
    (BatchFailed, 500, "inference_failed"),
    (ClientGone, 499, "client_closed_request"),
    (DecodeStopped, 499, "client_closed_request"),
]


def error_body(code: str, detail: str) -> dict:
    return {"error": code, "detail": detail, "request_id": REQUEST_ID.get()}


def error_bytes(code: str, detail: str) -> bytes:
    return json.dumps(error_body(code, detail)).encode()


async def send_error(send: Send, status: int, code: str, detail: str, headers: dict[str, str]) -> None:
    """The JSON error answer from ASGI middleware, which runs outside FastAPI's exception handlers."""
    body = error_bytes(code, detail)
    head = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in headers.items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


# Where a file of the other kind belongs, said in the service's terms.
OTHER_ENDPOINT = {"video": "POST /predict-video", "image": "POST /predict"}


def install_error_handlers(app: FastAPI) -> None:
    for exc_class, status, code in ERROR_TABLE:
        app.add_exception_handler(exc_class, _handler(status, code))

    @app.exception_handler(WrongMediaKind)
    async def _wrong_kind(_: Request, exc: WrongMediaKind) -> JSONResponse:  # where the file belongs
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
        code, detail = HTTP_ERRORS.get(exc.status_code, ("http_error", None))
        if detail is None:  # a framework's text, e.g. the multipart parser's: for the log only
            log.info("request %s: %d %s", REQUEST_ID.get(), exc.status_code, exc.detail)
            detail = f"the request was refused ({exc.status_code})"
        return JSONResponse(error_body(code, detail), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s: unhandled error", REQUEST_ID.get())
        return JSONResponse(error_body("internal_error", "the server failed to handle this request"), 500)


# Framework errors the project words itself.
HTTP_ERRORS = {
    400: (
        "malformed_request",
        "the request's form could not be read: a malformed multipart body or a field over its size",
    ),
    404: ("not_found", "no such endpoint"),
    405: ("method_not_allowed", "the endpoint does not take this method"),
}


def _handler(status: int, code: str):
    async def handle(_: Request, exc: Exception) -> JSONResponse:
        cause = exc.__cause__
        if cause is not None:  # the library's own words behind the project's sentence
            log.info("request %s: %s (%s: %s)", REQUEST_ID.get(), exc, type(cause).__name__, cause)
        return JSONResponse(error_body(code, str(exc)), status)

    return handle
