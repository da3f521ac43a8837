"""What `fer serve` asks of uvicorn to keep connections bounded, and the parts uvicorn lacks.

uvicorn closes idle keep-alive connections, caps concurrent requests (503) and waits for requests in
flight at shutdown. It has no deadline for a request's head (a connection that sends nothing, or its
headers a byte at a time, is held forever), no bound on the head's size with its httptools parser, and
no cap on open connections: `GuardedProtocol` adds those three. Limits on request bodies live in the
app (service.limits), which sees them under any server.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import uvicorn
from packaging.specifiers import SpecifierSet
from packaging.version import Version

# The uvicorn releases GuardedProtocol is tested with: it relies on internals of uvicorn's httptools
# protocol that a new minor release may change. pyproject.toml bounds uvicorn the same (tests/test_lock.py).
UVICORN_TESTED = SpecifierSet(">=0.30,<0.56")


def check_uvicorn(version: str) -> None:
    """Refuses an untested uvicorn in one sentence, before its internals are imported."""
    if Version(version) not in UVICORN_TESTED:
        raise RuntimeError(
            f"uvicorn {version} is not a release the connection guard of `fer serve` is tested with "
            f"({UVICORN_TESTED}): install the locked versions (pip install -c docker/requirements.lock .)"
        )


check_uvicorn(uvicorn.__version__)

# After the check, so an untested uvicorn that moved this class gets the sentence, not an ImportError.
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # noqa: E402

from service.errors import error_bytes  # noqa: E402
from service.settings import ServiceSettings  # noqa: E402

_HEAD_TOO_LARGE_BODY = error_bytes("header_too_large", "the request head is over its size limit")
HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\nconnection: close\r\n"
    + f"content-length: {len(_HEAD_TOO_LARGE_BODY)}\r\n\r\n".encode()
    + _HEAD_TOO_LARGE_BODY
)
# Connections above the cap that still get uvicorn's 503 answer before further ones are closed unanswered.
ANSWERED_OVERFLOW = 64


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float
    max_head_bytes: int
    max_connections: int


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size bound for each request's head, and a
    cap on open connections (uvicorn answers 503 to requests at the cap; well past it, a new connection
    is closed at once, so idle sockets cannot use up the process's file descriptors)."""

    def __init__(self, *args, limits: ConnectionLimits, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._in_head = True
        self._head_bytes = 0
        self._head_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections + ANSWERED_OVERFLOW:
            transport.close()
            return
        self._expect_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        in_head = self._in_head
        super().data_received(data)
        if in_head and self._in_head:  # the head is still incomplete after this chunk
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_head_bytes and not self.transport.is_closing():
                self.transport.write(HEAD_TOO_LARGE)
                self.transport.close()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._expect_head()  # the next request on this keep-alive connection

    def _expect_head(self) -> None:
        self._in_head, self._head_bytes = True, 0
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)

    def _head_timeout(self) -> None:
        if self._in_head and not self.transport.is_closing():
            self.transport.close()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None


def uvicorn_options(settings: ServiceSettings) -> dict:
    """The uvicorn.run / uvicorn.Config keywords for these settings."""
    limits = ConnectionLimits(
        settings.header_timeout_s, settings.max_header_kb * 1024, settings.max_connections
    )
    return {
        "http": partial(GuardedProtocol, limits=limits),
        "timeout_keep_alive": settings.keep_alive_s,
        "limit_concurrency": settings.max_connections,
        "timeout_graceful_shutdown": settings.shutdown_grace_s,
    }
