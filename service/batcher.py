"""Cross-request dynamic batching: one batcher owns the device.

Requests enqueue preprocessed uint8 tensors (a video's frames are items too); the batcher takes up to
`max_batch` items, waiting at most `max_wait_ms` after the first one while more work is on its way,
runs ONE encoder call in its own thread (the event loop stays free), and routes each row back to its
request, on the CPU. A job larger than a batch is split across batches. A failing call fails only the
jobs that had rows in it. The queue is bounded in items; a cancelled job (client gone) is skipped.

Shaped like LitServe's loops: a monotonic deadline, a size cap, and a batch's error sent to every
request in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

EncodeFn = Callable[[torch.Tensor], torch.Tensor]
T = TypeVar("T")


class QueueFull(Exception):
    """More items are waiting than FER_MAX_QUEUE allows; the client should retry later."""

    def __init__(self, retry_after_s: int):
        super().__init__("the inference queue is full, retry later")
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        """What the HTTP answer carries (the error handler passes any exception's `headers` on)."""
        return {"Retry-After": str(self.retry_after_s)}


class ClientGone(Exception):
    """The client disconnected while its job waited; the job was dropped."""


class BatchFailed(Exception):
    """The encoder call that held this job's rows raised."""


def pin_torch_threads(n: int) -> None:
    """Sets the calling thread's intra-op thread count for good. torch sets a thread's count from the
    process-wide value the first time the thread asks for it, undoing a count set before that; asking
    first makes that happen now. (The process-wide value becomes `n` too, for threads not yet started.)"""
    torch.get_num_threads()
    torch.set_num_threads(n)


@dataclass
class BatchStats:
    """What the batcher reports per encoder call (the service turns it into Prometheus metrics)."""

    on_batch: Callable[[int, float], None] = lambda size, seconds: None  # items, model seconds
    on_wait: Callable[[float], None] = lambda seconds: None  # queue wait of a job's first rows
    on_depth: Callable[[int], None] = lambda depth: None  # items waiting


@dataclass(eq=False)
class _Job:
    pixels: torch.Tensor
    future: asyncio.Future
    enqueued: float
    taken: int = 0  # rows handed to batches so far
    parts: list[torch.Tensor] = field(default_factory=list)
    cancelled: bool = False

    @property
    def remaining(self) -> int:
        return self.pixels.shape[0] - self.taken


class Batcher:
    def __init__(
        self,
        encode: EncodeFn,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 10.0,
        max_queue: int = 1024,
        stats: BatchStats | None = None,
        threads: int | None = None,
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_queue < max_batch:
            raise ValueError(f"max_queue ({max_queue}) must be at least max_batch ({max_batch})")
        self.encode = encode
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.stats = stats or BatchStats()
        self.calls = 0  # encoder calls made: tests assert batching on this, not on timing
        self._queue: deque[_Job] = deque()
        self._depth = 0  # image items queued, not yet handed to the encoder
        self._other = 0  # items of other device work (text) waiting or running
        self._expected = 0  # requests decoding now that will enqueue soon: worth waiting for
        self._wakeup = asyncio.Event()
        # `threads`: torch's intra-op threads for the encoder calls (the service gives them all).
        self._device_thread = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="fer-device",
            initializer=None if threads is None else pin_torch_threads,
            initargs=() if threads is None else (threads,),
        )
        self._task: asyncio.Task | None = None
        self._in_flight: list[tuple[_Job, int, int]] = []  # the jobs whose rows the device holds now
        self._mean_call_s = 0.05

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="fer-batcher")

    async def stop(self) -> None:
        held = [job for job, _, _ in self._in_flight]  # read before the cancelled loop clears it
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in [*self._queue, *held]:
            if not job.future.done():
                job.future.set_exception(BatchFailed("the service is shutting down"))
        self._queue.clear()
        self._device_thread.shutdown(wait=False, cancel_futures=True)

    @property
    def depth(self) -> int:
        return self._depth

    # ---- request side ---------------------------------------------------------------------------
    def expect(self) -> Callable[[], None]:
        """A request announces it will enqueue soon (it is decoding): the batcher may wait for it.
        Returns the function that withdraws the announcement (call it once, enqueued or not)."""
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
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
        poll_s: float = 0.25,
    ) -> torch.Tensor:
        """Queue `pixels` [k, ...] and wait for the encoder's k rows, in order."""
        n = pixels.shape[0]
        if n == 0:
            raise ValueError("nothing to encode")
        self._admit(n)
        job = _Job(pixels, asyncio.get_running_loop().create_future(), time.monotonic())
        self._queue.append(job)
        self._set_depth(self._depth + n)
        self._wakeup.set()
        try:
            while True:
                done, _ = await asyncio.wait({job.future}, timeout=poll_s if is_disconnected else None)
                if done:
                    return job.future.result()
                if await is_disconnected():
                    raise ClientGone()
        except (ClientGone, asyncio.CancelledError):
            self._cancel(job)  # nobody will read the rows: don't spend the device on them
            raise

    async def run(self, fn: Callable[..., T], *args, items: int = 0) -> T:
        """Other work for the device (text encoding) on the device thread, between encoder calls: it
        then has every intra-op thread, and takes turns with the image batches instead of competing.
        Its `items` (texts: each costs about what an image does) count towards `max_queue` while it
        waits and runs, so a flood of it gets 429s too instead of starving the image batches; work of
        more items than the queue holds counts as a full queue (it runs once the queue is empty)."""
        items = min(items, self.max_queue)
        self._admit(items)
        self._other += items
        self._report_depth()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._device_thread, partial(fn, *args))
        finally:
            self._other -= items
            self._report_depth()

    def retry_after(self) -> int:
        """Seconds until the queue has drained at the recent pace: the Retry-After of a 429."""
        batches = (self._depth + self._other) / self.max_batch
        return max(1, math.ceil(batches * self._mean_call_s))  # whole seconds, rounded up

    def _admit(self, n: int) -> None:
        if n > self.max_queue:
            raise ValueError(f"{n} items is more than the queue holds ({self.max_queue})")
        if self._depth + self._other + n > self.max_queue:
            raise QueueFull(self.retry_after())

    def _cancel(self, job: _Job) -> None:
        job.cancelled = True
        self._dequeue(job)

    def _dequeue(self, job: _Job) -> None:
        """Takes a job's rows that are still queued out of the queue (a split job may have some)."""
        if job in self._queue:
            self._queue.remove(job)
            self._set_depth(self._depth - job.remaining)

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        self._report_depth()

    def _report_depth(self) -> None:
        self.stats.on_depth(self._depth + self._other)

    # ---- batcher side ---------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._gather()
            taken = self._take()
            if not taken:
                continue
            parts = [job.pixels[start:stop] for job, start, stop in taken]
            n_rows = sum(stop - start for _, start, stop in taken)
            started = time.monotonic()
            for job, start, _ in taken:
                if start == 0:
                    self.stats.on_wait(started - job.enqueued)
            self._in_flight = taken
            try:
                # The concatenation runs in the device thread too: no work proportional to the batch
                # size runs on the event loop.
                features = await loop.run_in_executor(self._device_thread, self._encode_parts, parts)
                if features.shape[0] != n_rows:
                    raise RuntimeError(f"encoder returned {features.shape[0]} rows for {n_rows} inputs")
            except Exception as exc:  # one bad batch fails its own jobs; the loop serves on
                log.exception("encoder call on %d items failed", n_rows)
                for job, _, _ in taken:
                    self._fail(job, exc)
                continue
            finally:
                self.calls += 1
                self._in_flight = []
            seconds = time.monotonic() - started
            self._mean_call_s = 0.8 * self._mean_call_s + 0.2 * seconds
            self.stats.on_batch(n_rows, seconds)
            self._route(taken, features)

    def _encode_parts(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The features come back to the CPU here, so the device thread is busy until the device has
        finished: a GPU returns from its kernel launches at once, and without the wait the next batch
        would be taken while this one still ran (small batches), the call's time would count launches
        only, and the wait would land on the scoring threads."""
        return self.encode(parts[0] if len(parts) == 1 else torch.cat(parts)).cpu()

    async def _gather(self) -> None:
        """Waits for a first item, then until the batch is full, the deadline passes, or no other
        request is on its way (waiting then would only add latency)."""
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
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
        taken, room = [], self.max_batch
        while self._queue and room > 0:
            job = self._queue[0]  # cancelled and failed jobs have already left the queue
            count = min(room, job.remaining)
            taken.append((job, job.taken, job.taken + count))
            job.taken += count
            room -= count
            if job.remaining == 0:
                self._queue.popleft()
        self._set_depth(self._depth - (self.max_batch - room))
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

    def _fail(self, job: _Job, exc: Exception) -> None:
        self._dequeue(job)  # a split job: drop its remaining rows too
        if not job.future.done():
            job.future.set_exception(BatchFailed(str(exc) or type(exc).__name__))
