"""Which id a request goes by. A caller's own X-Request-ID is kept when it is plain (`CLIENT_ID`), else
the request gets a new one.

Under Ray Serve the proxy sets the id: it keeps whatever X-Request-ID a client sent, else makes one,
logs it, passes it to the replica in the request's headers and adds it to the answer (`RequestId`
then takes it from there and adds no second header). `serve_proxy_middlewares` makes Serve's proxy
follow this service's rule: named by `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` where Ray starts
(docs/ray.md), it drops an id that is not plain before Serve reads it, so Serve makes a new one. This
module imports only Starlette: the proxy processes load it and nothing else of the service.
"""

from __future__ import annotations

import re

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # a caller's own id is kept when it is this plain
HEADER = b"x-request-id"


def client_id(scope: Scope) -> str | None:
    """The first X-Request-ID of the request, if it is plain (Serve's proxy reads the first one)."""
    for name, value in scope.get("headers", ()):
        if name == HEADER:
            given = value.decode("latin-1")
            return given if CLIENT_ID.fullmatch(given) else None
    return None


class PlainRequestId:
    """Leaves a request at most one X-Request-ID, a plain one: Serve's own request-id middleware, which
    this one wraps, makes an id for a request left without."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = client_id(scope)
            headers = [(name, value) for name, value in scope.get("headers", ()) if name != HEADER]
            if given is not None:
                headers.append((HEADER, given.encode("latin-1")))
            scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)


def serve_proxy_middlewares() -> list[Middleware]:
    """Ray Serve's HTTP proxy callback (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`)."""
    return [Middleware(PlainRequestId)]
