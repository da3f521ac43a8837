"""Request bodies within bounds, as ASGI middleware in front of the app: one upload over `max_bytes` gets
413 (from Content-Length, or counted while it streams, so it is never read whole); the upload bytes
received and not yet answered are bounded over all requests (503 beyond), so held-open uploads cannot
fill memory or the disk the form parser spools to; and a body not received whole within `timeout_s`
gets 408, so a trickling client cannot hold a request (and shutdown) open.

The bound counts bytes as they arrive, not the Content-Length a request declares: a declaration costs
nothing to make, and requests that declare much and send nothing would otherwise shut every other
upload out for as long as their body timeout."""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import send_error


class _Refused(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}


class UploadLimits:
    def __init__(self, app: ASGIApp, *, max_bytes: int, max_inflight_bytes: int, timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.max_inflight_bytes = max_inflight_bytes
        self.timeout_s = timeout_s
        self.inflight = 0  # body bytes of the requests being handled now

    def too_large(self) -> _Refused:
        return _Refused(
            413, "upload_too_large", f"the upload is over the {self.max_bytes / 2**20:g} MB limit"
        )

    def too_many(self) -> _Refused:
        mb = self.max_inflight_bytes / 2**20
        return _Refused(
            503, "uploads_full", f"{mb:g} MB of uploads are being received; retry later", {"Retry-After": "1"}
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _refuse(send, self.too_large())
            return
        held = 0  # body bytes received, counted in `inflight` until the answer
        body_done, refused, started = False, None, False
        deadline = time.monotonic() + self.timeout_s

        async def limited_receive() -> Message:
            nonlocal held, body_done, refused
            if body_done:
                return await receive()  # after the body: disconnect polling, no deadline
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                refused = _Refused(
                    408, "upload_too_slow", f"the upload was not received within {self.timeout_s:g} s"
                )
                raise refused from None
            if message["type"] == "http.request":
                size = len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if held + size > self.max_bytes:
                    refused = self.too_large()
                    raise refused
                if self.inflight + size > self.max_inflight_bytes:
                    refused = self.too_many()
                    raise refused
                self.inflight += size
                held += size
            return message

        def release() -> None:
            nonlocal held
            self.inflight -= held
            held = 0

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused is not None:
                return  # the app's own answer to the broken body is replaced by the refusal below
            started = True
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                # Released before the client sees the end of its answer: its next upload may follow at once,
                # while the app is still cleaning up (the form's spooled files).
                release()
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if refused is None:
                raise
        finally:
            release()
        if refused is not None and not started:
            await _refuse(send, refused)


async def _refuse(send: Send, refused: _Refused) -> None:
    # connection: close, since the rest of the body is not read
    await send_error(
        send, refused.status, refused.code, refused.detail, {"connection": "close", **refused.headers}
    )
