"""`fer serve`'s connection guard (service.connections) in front of small ASGI apps, in a uvicorn server
on a thread: request heads bounded wherever they fall in the reads, pipelined requests answered, and
answers given before a request was read whole reaching their client."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from service.connections import uvicorn_options
from service.settings import ServiceSettings
from tests.support import free_port, run_bounded

SLOW_S = 1.0  # how long /slow takes to answer: longer than the head timeout of these tests
BLOCKING = threading.Event()  # set while /block holds the server's event loop


async def echo(scope, receive, send) -> None:
    """Reads the whole body and answers its size; /slow answers after SLOW_S."""
    if scope["type"] != "http":
        return
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    if scope["path"] == "/slow":
        await asyncio.sleep(SLOW_S)
    if scope["path"] == "/block":  # holds the event loop itself, so that other clients' bytes pile up
        BLOCKING.set()
        time.sleep(0.5)
    await answer(send, 200, {"bytes": size})


async def refuse(scope, receive, send) -> None:
    """Answers at once, before reading the body; /close says `connection: close` itself, as the upload
    limits do."""
    if scope["type"] == "http":
        close = [(b"connection", b"close")] if scope["path"] == "/close" else []
        await answer(send, 503, {"error": "full"}, [(b"retry-after", b"1"), *close])


async def answer(send, status: int, body: dict, headers=()) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


@contextmanager
def serving(app, **settings) -> Iterator[int]:
    """`app` behind the uvicorn options `fer serve` uses for these FER_* settings; yields the port."""
    port = free_port()
    options = uvicorn_options(ServiceSettings(**settings))
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off", **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def post(path: str, body: bytes, declared: int | None = None, extra: bytes = b"") -> bytes:
    """A POST with `body`, whose Content-Length says `declared` (default: the body's length)."""
    length = len(body) if declared is None else declared
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n".encode() + extra + b"\r\n" + body
    )


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (TimeoutError if it never does)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def read_responses(sock: socket.socket, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """The first `count` responses (fewer if the server closes first)."""
    data = b""
    while len(found := responses(data)) < count and (chunk := sock.recv(65536)):
        data += chunk
    return found


def responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """(status, headers, body) of each whole HTTP/1.1 response in `data` (bodies with a Content-Length)."""
    found = []
    while b"\r\n\r\n" in data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        length = int(headers.get("content-length", 0))
        if len(rest) < length:
            break
        found.append((int(lines[0].split()[1]), headers, rest[:length]))
        data = rest[length:]
    return found


# ---- request heads ------------------------------------------------------------------------------
def test_a_head_over_its_size_is_refused_when_it_arrives_in_one_read():
    """The whole head in one read: it arrives while the server's event loop is held by another request."""
    with serving(echo, max_header_kb=16) as port, connect(port) as busy, connect(port) as sock:
        busy.sendall(post("/block", b""))
        assert BLOCKING.wait(10)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 60_000 + b"\r\n\r\n")
        (status, _, body), *_ = read_responses(sock, 1)
    assert status == 431 and json.loads(body)["error"] == "header_too_large"


def test_a_head_over_its_size_is_refused_when_it_arrives_over_many_reads():
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 60_000 + b"\r\n\r\n"
    with serving(echo, max_header_kb=16) as port, connect(port) as sock:
        for start in range(0, len(head), 3000):
            sock.sendall(head[start : start + 3000])
            time.sleep(0.005)
        (status, _, body), *_ = read_responses(sock, 1)
    assert status == 431 and json.loads(body)["error"] == "header_too_large"


def test_pipelined_uploads_are_all_answered():
    """The second upload's body arrives after the first's answer, with a third request behind it: each
    body is its request's, not the head of a next one."""
    second = post("/", b"b" * 100_000)
    with serving(echo, max_header_kb=4) as port, connect(port) as sock:
        sock.sendall(post("/", b"a" * 1000) + second[:200])
        answers = read_responses(sock, 1)
        sock.sendall(second[200:] + post("/", b"c" * 3))
        answers += read_responses(sock, 2)
    assert [(status, json.loads(body)["bytes"]) for status, _, body in answers] == [
        (200, 1000), (200, 100_000), (200, 3),
    ]  # fmt: skip


def test_a_pipelined_request_slower_than_the_head_timeout_keeps_its_answer():
    with serving(echo, header_timeout_s=0.3) as port, connect(port) as sock:
        sock.sendall(post("/", b"x") + post("/slow", b"yy", extra=b"Connection: close\r\n"))
        answers = read_responses(sock, 2)
    assert [(status, json.loads(body)["bytes"]) for status, _, body in answers] == [(200, 1), (200, 2)]


# ---- answers given before the request was read whole ---------------------------------------------
def test_an_early_answer_closes_the_connection_once_the_client_has_sent_the_rest():
    """An answer sent while the body still streams in says `connection: close` and is the only one: the
    rest of the body is read and dropped, not parsed as a next request (no 431 for it)."""
    with serving(refuse, max_header_kb=4) as port, connect(port) as sock:
        sock.sendall(post("/", b"", declared=300_000))
        (status, headers, _), *more = read_responses(sock, 1)
        assert status == 503 and headers["connection"] == "close" and more == []
        for _ in range(30):
            sock.sendall(b"z" * 10_000)
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b""  # closed by the server, with no second answer


def test_early_refusals_reach_every_client():
    """Clients sending large bodies at once, each refused as soon as its head is read, all read their
    answer: the server does not close with their data unread (a reset that loses the answer)."""
    body = b"v" * 2_800_000

    async def flood(port: int) -> list:
        limits = httpx.Limits(max_connections=8)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=30
        ) as client:

            async def one():
                try:
                    return (await client.post("/close", content=body)).status_code
                except httpx.TransportError as exc:
                    return type(exc).__name__

            return await asyncio.gather(*(one() for _ in range(8)))

    with serving(refuse) as port:
        assert run_bounded(flood(port)) == [503] * 8


@pytest.mark.parametrize("bound", [{"linger_s": 0.3}, {"linger_mb": 0.5}])
def test_a_lingering_close_is_bounded(bound):
    """A client that goes on sending after its answer is cut off at the time or the byte bound."""
    with serving(refuse, **bound) as port, connect(port) as sock:
        sock.sendall(post("/", b"", declared=10**9))
        assert read_responses(sock, 1)[0][0] == 503
        deadline = time.monotonic() + 10
        with pytest.raises(OSError):  # reset by the server once past its bound
            while time.monotonic() < deadline:
                sock.sendall(b"z" * 4096)
                time.sleep(0.001 if "linger_s" in bound else 0)
