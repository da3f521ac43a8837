"""Who may call, and which request is which: ASGI middleware for the request id (a header on every
answer, in every error body and in the log lines about the request) and for the optional API key."""

from __future__ import annotations

import hmac
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import REQUEST_ID, send_error
from service.request_ids import HEADER, client_id

OPEN_PATHS = ("/livez", "/", "/favicon.ico")  # liveness and the page (its files ask for nothing secret)
OPEN_PREFIXES = ("/static/", "/docs-assets/")  # the page's and the API docs' own files


class RequestId:
    """Takes the caller's X-Request-ID when it is plain, else makes one; sets it for the request's
    code (REQUEST_ID) and returns it in the answer's headers. `from_proxy`: a proxy in front (Ray
    Serve's) has chosen the id, passes it in the request's header and answers with it itself, so it is
    taken as given and not added again (service.request_ids)."""

    def __init__(self, app: ASGIApp, from_proxy: bool = False):
        self.app = app
        self.from_proxy = from_proxy

    def _choose(self, scope: Scope) -> str:
        if self.from_proxy:
            for name, value in scope.get("headers", ()):
                if name == HEADER:  # the proxy's own, whatever its form: the one it logged
                    return value.decode("latin-1")
        return client_id(scope) or uuid.uuid4().hex

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = self._choose(scope)
        token = REQUEST_ID.set(request_id)

        async def tagged_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (HEADER, request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send if self.from_proxy else tagged_send)
        finally:
            REQUEST_ID.reset(token)


class ApiKey:
    """With a key configured, every path but liveness and the page needs `X-API-Key: <key>` (or
    `Authorization: Bearer <key>`); anything else gets 401 before any work is done."""

    def __init__(self, app: ASGIApp, key: str):
        self.app = app
        self.key = key.encode()

    def allowed(self, scope: Scope) -> bool:
        path = scope.get("path", "")
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES) or scope.get("method") == "OPTIONS":
            return True  # OPTIONS: CORS preflights carry no credentials
        headers = dict(scope.get("headers", ()))
        given = headers.get(b"x-api-key") or headers.get(b"authorization", b"").removeprefix(b"Bearer ")
        return hmac.compare_digest(given, self.key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.allowed(scope):
            await self.app(scope, receive, send)
            return
        await send_error(
            send,
            401,
            "unauthorized",
            "this service needs an API key: send X-API-Key",
            {"www-authenticate": 'ApiKey header="X-API-Key"'},
        )
