"""Cross-request dynamic batching: one batcher owns the device.

Requests submit preprocessed uint8 tensors (a video's frames are items too); the batcher takes up to
`max_batch` items, one from each waiting request in turn, waiting at most `max_wait_ms` after the first
one while more work is on its way, runs ONE encoder call in its own thread (the event loop stays free),
and routes each row back to its request, on the CPU. A job larger than a batch is split across batches. A failing call fails only the
jobs that had rows in it; a cancelled job (client gone) is skipped. Other device work (text encoding)
waits in its own queue and takes turns with the image batches, so neither can starve the other.

How much may wait is not the batcher's business: requests are admitted before they decode
(service.admission). Shaped like LitServe's loops: a monotonic deadline, a size cap, and a batch's
error sent to every request in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import torch

from model.threads import pin_torch_threads

log = logging.getLogger(__name__)

EncodeFn = Callable[[torch.Tensor], torch.Tensor]
Disconnected = Callable[[], Awaitable[bool]]
T = TypeVar("T")
POLL_S = 0.25  # how often a waiting request checks that its client is still there


class ClientGone(Exception):
    """The client disconnected while its job waited; the job was dropped."""


class BatchFailed(Exception):
    """The encoder call that held this job's rows raised. The message is for clients, in the project's
    words; the device's own error (a CUDA message, a shape) is in the log line of the failed call."""

    def __init__(self, detail: str = "the model failed on the batch that held this request's rows"):
        super().__init__(detail)


@dataclass
class BatchStats:
    """What the batcher reports (the service turns it into metrics and its Retry-After estimates)."""

    on_batch: Callable[[int, float], None] = lambda items, seconds: None  # an encoder call
    on_task: Callable[[int, float], None] = lambda items, seconds: None  # other device work (texts)
    on_wait: Callable[[float], None] = lambda seconds: None  # queue wait of a job's first rows


@dataclass(eq=False)
class _Job:
    pixels: torch.Tensor
    future: asyncio.Future
    enqueued: float
    on_wait: Callable[[float], None] | None = None  # the request's own queue wait
    taken: int = 0  # rows handed to batches so far
    parts: list[torch.Tensor] = field(default_factory=list)
    cancelled: bool = False

    @property
    def remaining(self) -> int:
        return self.pixels.shape[0] - self.taken


@dataclass(eq=False)
class _Task:
    call: Callable[[], object]
    future: asyncio.Future
    items: int  # texts it encodes: what its cost is reported per


class Batcher:
    def __init__(
        self,
        encode: EncodeFn,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 10.0,
        stats: BatchStats | None = None,
        threads: int | None = None,
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.encode = encode
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.stats = stats or BatchStats()
        self.calls = 0  # encoder calls made: tests assert batching on this, not on timing
        self._queue: deque[_Job] = deque()
        self._tasks: deque[_Task] = deque()
        self._depth = 0  # image rows queued, not yet handed to the encoder
        self._expected = 0  # requests decoding now that will submit soon: worth waiting for
        self._wakeup = asyncio.Event()
        self._images_next = True  # whose turn it is when both queues hold work
        # `threads`: torch's intra-op threads for the device thread (the service gives it the CPUs).
        self._device_thread = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="fer-device",
            initializer=None if threads is None else pin_torch_threads,
            initargs=() if threads is None else (threads,),
        )
        self._loop_task: asyncio.Task | None = None
        self._in_flight: list[_Job | _Task] = []  # the jobs whose rows the device holds now, or its task

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="fer-batcher")

    async def stop(self) -> None:
        held = list(self._in_flight)  # read before the cancelled loop clears it
        if self._loop_task:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for waiter in [*self._queue, *held, *self._tasks]:
            if not waiter.future.done():
                waiter.future.set_exception(BatchFailed("the service is shutting down"))
        self._queue.clear()
        self._tasks.clear()
        self._device_thread.shutdown(wait=False, cancel_futures=True)

    @property
    def depth(self) -> int:
        """Image rows waiting for the encoder."""
        return self._depth

    # ---- request side ---------------------------------------------------------------------------
    def expect(self) -> Callable[[], None]:
        """A request announces it will submit soon (it is decoding): the batcher may wait for it.
        Returns the function that withdraws the announcement (call it once, submitted or not)."""
        self._expected += 1
        done = False

        def withdraw() -> None:
            nonlocal done
            if not done:
                done = True
                self._expected -= 1
                self._wakeup.set()

        return withdraw

    async def submit(
        self,
        pixels: torch.Tensor,
        is_disconnected: Disconnected | None = None,
        on_wait: Callable[[float], None] | None = None,
    ) -> torch.Tensor:
        """Queue `pixels` [k, ...] and wait for the encoder's k rows, in order. `on_wait` is told how
        long the first rows waited for an encoder call (the response's timing)."""
        if pixels.shape[0] == 0:
            raise ValueError("nothing to encode")
        job = _Job(pixels, asyncio.get_running_loop().create_future(), time.monotonic(), on_wait)
        self._queue.append(job)
        self._depth += job.remaining
        self._wakeup.set()
        try:
            return await wait_watched(job.future, is_disconnected)
        except (ClientGone, asyncio.CancelledError):
            self._cancel(job)  # nobody will read the rows: don't spend the device on them
            raise

    async def run(
        self, fn: Callable[..., T], *args, items: int = 0, is_disconnected: Disconnected | None = None
    ) -> T:
        """Other work for the device (encoding `items` texts), on the device thread, in turn with the
        image batches: it then has every intra-op thread, and neither kind of work starves the other."""
        task = _Task(partial(fn, *args), asyncio.get_running_loop().create_future(), items)
        self._tasks.append(task)
        self._wakeup.set()
        try:
            return await wait_watched(task.future, is_disconnected)
        except (ClientGone, asyncio.CancelledError):
            with contextlib.suppress(ValueError):
                self._tasks.remove(task)  # not started yet: drop it
            raise

    def _cancel(self, job: _Job) -> None:
        job.cancelled = True
        self._dequeue(job)

    def _dequeue(self, job: _Job) -> None:
        """Takes a job's rows that are still queued out of the queue (a split job may have some)."""
        if job in self._queue:
            self._queue.remove(job)
            self._depth -= job.remaining

    # ---- batcher side ---------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            while not self._queue and not self._tasks:
                self._wakeup.clear()
                await self._wakeup.wait()
            images = bool(self._queue) and (self._images_next or not self._tasks)
            self._images_next = not images
            if images:
                await self._encode_batch()
            else:
                await self._run_task(self._tasks.popleft())

    async def _run_task(self, task: _Task) -> None:
        started = time.monotonic()
        self._in_flight = [task]  # out of the queue: `stop` finds it here
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._device_thread, task.call)
        except Exception as exc:
            if not task.future.done():
                task.future.set_exception(exc)
            return
        finally:
            self._in_flight = []
            self.stats.on_task(task.items, time.monotonic() - started)
        if not task.future.done():
            task.future.set_result(result)

    async def _encode_batch(self) -> None:
        await self._gather()
        taken = self._take()
        if not taken:
            return
        parts = [job.pixels[start:stop] for job, start, stop in taken]
        n_rows = sum(stop - start for _, start, stop in taken)
        started = time.monotonic()
        for job, start, _ in taken:
            if start == 0:
                self.stats.on_wait(started - job.enqueued)
                if job.on_wait is not None:
                    job.on_wait(started - job.enqueued)
        self._in_flight = [job for job, _, _ in taken]
        try:
            # The concatenation runs in the device thread too: no work proportional to the batch
            # size runs on the event loop.
            features = await asyncio.get_running_loop().run_in_executor(
                self._device_thread, self._encode_parts, parts
            )
            if features.shape[0] != n_rows:
                raise RuntimeError(f"encoder returned {features.shape[0]} rows for {n_rows} inputs")
        except Exception:  # one bad batch fails its own jobs; the loop serves on
            log.exception("encoder call on %d items failed", n_rows)  # the cause, for the operator
            for job, _, _ in taken:
                self._fail(job)
            return
        finally:
            self.calls += 1
            self._in_flight = []
        self.stats.on_batch(n_rows, time.monotonic() - started)
        self._route(taken, features)

    def _encode_parts(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The features come back to the CPU here, so the device thread is busy until the device has
        finished: a GPU returns from its kernel launches at once, and without the wait the next batch
        would be taken while this one still ran (small batches), the call's time would count launches
        only, and the wait would land on the scoring threads."""
        return self.encode(parts[0] if len(parts) == 1 else torch.cat(parts)).cpu()

    async def _gather(self) -> None:
        """Waits until the batch is full, the deadline passes, or no other request is on its way
        (waiting then would only add latency)."""
        deadline = time.monotonic() + self.max_wait
        while self._depth < self.max_batch and self._expected > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[tuple[_Job, int, int]]:
        """Up to `max_batch` rows, one from each waiting job in turn: a one-face request gets into the
        next batch however many clips' frames are queued before it, and a clip's frames share batches
        with the others instead of holding them. Jobs served move to the back of the queue."""
        counts: dict[_Job, int] = {}
        room = self.max_batch
        while room > 0:
            before = room
            for job in self._queue:
                if not room:  # the batch is full: the rest of a long queue need not be walked
                    break
                if job.remaining > counts.get(job, 0):
                    counts[job] = counts.get(job, 0) + 1
                    room -= 1
            if room == before:  # every queued row is taken
                break
        taken = []
        for job, count in counts.items():
            taken.append((job, job.taken, job.taken + count))
            job.taken += count
        waiting = [job for job in self._queue if job not in counts]
        self._queue = deque(waiting + [job for job in counts if job.remaining > 0])
        self._depth -= self.max_batch - room
        return taken

    def _route(self, taken: list[tuple[_Job, int, int]], features: torch.Tensor) -> None:
        offset = 0
        for job, start, stop in taken:
            part = features[offset : offset + stop - start]
            offset += stop - start
            if job.future.done() or job.cancelled:
                continue
            job.parts.append(part)
            if stop == job.pixels.shape[0]:
                job.future.set_result(job.parts[0] if len(job.parts) == 1 else torch.cat(job.parts))

    def _fail(self, job: _Job) -> None:
        self._dequeue(job)  # a split job: drop its remaining rows too
        if not job.future.done():
            job.future.set_exception(BatchFailed())


async def wait_watched(future: asyncio.Future, is_disconnected: Disconnected | None):
    """The future's result; with `is_disconnected`, ClientGone as soon as the client has left."""
    while True:
        done, _ = await asyncio.wait({future}, timeout=POLL_S if is_disconnected else None)
        if done:
            return future.result()
        if await is_disconnected():
            raise ClientGone()
