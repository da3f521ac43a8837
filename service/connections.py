"""What `fer serve` asks of uvicorn to keep connections bounded, and the parts uvicorn lacks.

uvicorn closes idle keep-alive connections, caps concurrent requests (503) and waits for requests in
flight at shutdown. It has no deadline for a request's head (a connection that sends nothing, or its
headers a byte at a time, is held forever), no bound on the head's size with its httptools parser, and
no cap on open connections; and after an answer given while the request still streams in (a limit's
refusal) it closes the connection with the client's data unread, which resets it: the client, still
sending, can lose the answer. `GuardedProtocol` adds the deadline, the bound and the cap, and closes
such connections lingering. Limits on request bodies live in the app (service.limits), which sees them
under any server.
"""

from __future__ import annotations

import asyncio
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
    linger_s: float
    linger_bytes: int


class HeadTooLarge(Exception):
    """Raised in a parser callback, so the parser stops where the head passed its limit."""


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size bound for each request's head, a cap on
    open connections (uvicorn answers 503 to requests at the cap; well past it, a new connection is
    closed at once, so idle sockets cannot use up the process's file descriptors), and a lingering close.

    A head is tracked from the parser's message begin to its headers complete, in whatever reads it
    arrives: with a body's tail before it (pipelining) or a body after it. Its size is at least what the
    parser has handed over (request target, header names and values) and at least the reads that held
    nothing but its bytes (httptools holds a header until its end); either one over the limit gets 431,
    so a head within the limit is never refused. The head's deadline runs while the connection waits for
    a head: from its start, and from the first byte after an answer (uvicorn's keep-alive timeout bounds
    the idle time before)."""

    def __init__(self, *args, limits: ConnectionLimits, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._socket: asyncio.Transport | None = None  # uvicorn's `transport` wraps it (_AnswerTransport)
        self._in_head = False
        self._heads = 0  # heads begun on this connection: tells one from the next within a read
        self._head_parsed = 0  # what the parser has handed over of the current head
        self._head_reads = 0  # the reads that held nothing but the current head's bytes
        self._head_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None  # set once the connection lingers
        self._discarded = 0

    @property
    def lingering(self) -> bool:
        return self._linger_timer is not None

    # ---- the connection -----------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self._socket = transport
        super().connection_made(_AnswerTransport(transport, self))
        if len(self.connections) > self.limits.max_connections + ANSWERED_OVERFLOW:
            transport.close()
            return
        self._expect_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self._discarded += len(data)
            if self._discarded > self.limits.linger_bytes:
                self._socket.close()
            return
        heads, in_head, in_body = self._heads, self._in_head, self._in_body()
        super().data_received(data)
        if self._socket.is_closing() or self.lingering:
            return
        # A read that began inside this head, or between requests with this head the first begun in it
        if self._in_head and not in_body and self._heads == heads + (not in_head):
            self._head_reads += len(data)
            if self._head_reads > self.limits.max_head_bytes:
                self._refuse_head()
        elif not self._in_head and self._idle():  # bytes that begin no request (blank lines) still wait
            self._expect_head()

    def close_connection(self) -> None:
        """uvicorn's close of this connection. While the client is still sending its request (after an
        answer given early: a limit's refusal, a 431), the answer is followed by the end of our stream
        and what the client sends is read and dropped until it stops, `linger_s` passes or `linger_bytes`
        have come (a lingering close, as nginx's): closed with its data unread, the socket would be reset,
        and the client could lose the answer."""
        if self.lingering or self._socket.is_closing() or not self._client_sending():
            self._socket.close()
            return
        self._cancel_head_timer()
        self._unset_keepalive_if_required()
        self._linger_timer = self.loop.call_later(self.limits.linger_s, self._socket.close)
        if self._socket.can_write_eof():
            self._socket.write_eof()  # after the answer: the client reads it to its end
        self.flow.resume_reading()

    def _client_sending(self) -> bool:
        return self._in_head or self._in_body()

    def _in_body(self) -> bool:
        """Whether the parser is inside a request's body (uvicorn's `more_body` ends with the message)."""
        return not self._in_head and self.cycle is not None and self.cycle.more_body

    def _idle(self) -> bool:
        return (self.cycle is None or self.cycle.response_complete) and not self.pipeline

    # ---- the parser's callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._heads = True, self._heads + 1
        self._head_parsed = self._head_reads = 0
        self._expect_head()

    def on_url(self, url: bytes) -> None:
        self._count_parsed(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_parsed(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        previous = self.cycle
        super().on_headers_complete()
        if self.cycle is not previous:  # a request for the app (not an upgrade)
            self.cycle.send = partial(_close_if_early, self.cycle, self.cycle.send)

    def send_400_response(self, msg: str) -> None:
        if self._head_parsed > self.limits.max_head_bytes:  # the parser stopped at HeadTooLarge
            self._refuse_head()
        else:
            super().send_400_response(msg)

    # ---- the head ------------------------------------------------------------------------------------
    def _count_parsed(self, size: int) -> None:
        self._head_parsed += size
        if self._head_parsed > self.limits.max_head_bytes:
            raise HeadTooLarge()

    def _refuse_head(self) -> None:
        self.transport.write(HEAD_TOO_LARGE)
        self.transport.close()

    def _expect_head(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)

    def _head_timeout(self) -> None:
        self._head_timer = None
        self._socket.close()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None


class _AnswerTransport:
    """The connection's transport as uvicorn sees it: closing it is the protocol's `close_connection`, and
    a lingering connection is closing to uvicorn (it starts no further request on it)."""

    def __init__(self, socket: asyncio.Transport, protocol: GuardedProtocol):
        self._socket = socket
        self._protocol = protocol

    def __getattr__(self, name: str):
        return getattr(self._socket, name)

    def close(self) -> None:
        self._protocol.close_connection()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._socket.is_closing()


async def _close_if_early(cycle, send, message) -> None:
    """uvicorn's `send` for one request, with an answer begun while the request's body still streams in
    ending the connection (uvicorn then says `connection: close`): the rest of the body, of any length,
    is not read as the next request."""
    if message["type"] == "http.response.start" and cycle.more_body:
        cycle.keep_alive = False
    await send(message)


def uvicorn_options(settings: ServiceSettings) -> dict:
    """The uvicorn.run / uvicorn.Config keywords for these settings."""
    limits = ConnectionLimits(
        settings.header_timeout_s,
        settings.max_header_kb * 1024,
        settings.max_connections,
        settings.linger_s,
        settings.linger_bytes,
    )
    return {
        "http": partial(GuardedProtocol, limits=limits),
        "timeout_keep_alive": settings.keep_alive_s,
        "limit_concurrency": settings.max_connections,
        "timeout_graceful_shutdown": settings.shutdown_grace_s,
    }
