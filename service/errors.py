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
    """The upload's declared type is not one this endpoint takes; the message names what it takes."""

    def __init__(self, declared: str, accepted: tuple[str, ...]):
        kinds = " or ".join(MEDIA_KINDS.get(prefix, prefix) for prefix in accepted)
        super().__init__(f"{declared} is not accepted here: send {kinds}")


# The type prefixes the endpoints accept, as a person names them.
MEDIA_KINDS = {
    "image/": "an image (image/*)",
    "video/": "a video (video/*)",
    "image/gif": "an animated GIF (image/gif)",
}


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


def log_refusal(status: int, code: str, detail: str, cause: object = None) -> None:
    """One log line per error answer: the request id, the status, and the sentence the client got,
    with the library's own words behind it where there are some (they never reach the client)."""
    if isinstance(cause, BaseException):
        cause = f"{type(cause).__name__}: {cause}"
    behind = f" ({cause})" if cause else ""
    level = logging.WARNING if status >= 500 else logging.INFO
    log.log(level, "request %s: %d %s: %s%s", REQUEST_ID.get(), status, code, detail, behind)


def error_response(
    status: int, code: str, detail: str, headers: dict | None = None, cause: object = None
) -> JSONResponse:
    log_refusal(status, code, detail, cause)
    return JSONResponse(error_body(code, detail), status, headers=headers)


def error_bytes(code: str, detail: str) -> bytes:
    return json.dumps(error_body(code, detail)).encode()


async def send_error(send: Send, status: int, code: str, detail: str, headers: dict[str, str]) -> None:
    """The JSON error answer from ASGI middleware, which runs outside FastAPI's exception handlers."""
    log_refusal(status, code, detail)
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
        return error_response(400, "wrong_endpoint", f"{exc}: send it to {OTHER_ENDPOINT[exc.kind]}")

    @app.exception_handler(QueueFull)
    async def _queue_full(_: Request, exc: QueueFull) -> JSONResponse:
        return error_response(429, "queue_full", str(exc), {"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        message = FIELD_KINDS.get(first.get("type"), first.get("msg", "invalid"))
        meaning = _field_meaning(request, where) if first.get("type") == "missing" else None
        return error_response(
            422, "invalid_field", f"{where}: {message}" + (f": {meaning}" if meaning else "")
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code, detail = HTTP_ERRORS.get(exc.status_code, ("http_error", None))
        cause = None
        if exc.status_code == 405 and exc.headers and "Allow" in exc.headers:
            allowed = [m for m in exc.headers["Allow"].split(", ") if m != "HEAD"]
            detail = f"{request.method} is not accepted here: {request.url.path} takes {' or '.join(allowed)}"
        elif detail is None:  # a framework's text, e.g. the multipart parser's: for the log only
            cause = exc.detail
            detail = f"the request was refused ({exc.status_code})"
        return error_response(exc.status_code, code, detail, exc.headers, cause)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s: unhandled error", REQUEST_ID.get())
        return error_response(500, "internal_error", "the server failed to handle this request")


# Framework errors the project words itself.
HTTP_ERRORS = {
    400: (
        "malformed_request",
        "the request's form could not be read: a malformed multipart body or a field over its size",
    ),
    404: ("not_found", "no such endpoint"),
    405: ("method_not_allowed", "the endpoint does not take this method"),
}

# A form field of the wrong kind, by pydantic's error type: what the field takes, said plainly.
FIELD_KINDS = {
    "missing": "the field is required",
    "bool_parsing": "give true or false",
    "bool_type": "give true or false",
    "int_parsing": "give a whole number",
    "int_from_float": "give a whole number",
    "int_type": "give a whole number",
}


def _field_meaning(request: Request, name: str) -> str | None:
    """What the route's form field `name` takes: its description in the schema."""
    body = getattr(request.scope.get("route"), "body_field", None)  # FastAPI's model of the whole form
    fields = getattr(body.field_info.annotation, "model_fields", {}) if body is not None else {}
    return fields[name].description if name in fields else None


def _handler(status: int, code: str):
    async def handle(_: Request, exc: Exception) -> JSONResponse:
        return error_response(status, code, str(exc), cause=exc.__cause__)

    return handle
