"""Who may call, and which request is which: ASGI middleware for the request id (a header on every
answer, in every error body and in the log lines about the request) and for the optional API key."""

from __future__ import annotations

import hmac
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import REQUEST_ID, send_error

CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # a caller's own id is kept when it is this plain
OPEN_PATHS = ("/livez", "/", "/favicon.ico")  # liveness and the page (its files ask for nothing secret)
OPEN_PREFIXES = ("/static/", "/docs-assets/")  # the page's and the API docs' own files


class RequestId:
    """Takes the caller's X-Request-ID when it is plain, else makes one; sets it for the request's
    code (REQUEST_ID) and returns it in the answer's headers."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers", ())).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)

        async def tagged_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())],
                }
            await send(message)

        try:
            await self.app(scope, receive, tagged_send)
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
