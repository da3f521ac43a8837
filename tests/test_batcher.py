"""The batcher alone, with a fake encoder whose output rows identify their inputs."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

import service.batcher
from service.batcher import Batcher, BatchFailed, BatchStats, ClientGone
from tests.support import DeviceFeatures, run_bounded


def items(*values: int) -> torch.Tensor:
    """k items, each a [1] tensor holding its value; the fake encoder echoes it back as a float row."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1)


class FakeEncoder:
    def __init__(self, poison: float | None = None):
        self.batches: list[list[float]] = []
        self.poison = poison
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set once a call has started

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        self.gate.wait(10)
        self.batches.append(pixels.view(-1).tolist())
        if self.poison is not None and self.poison in pixels:
            raise RuntimeError("poisoned batch")
        return pixels * 10


async def held_device(
    first: torch.Tensor, encoder: FakeEncoder | None = None, **kwargs
) -> tuple[FakeEncoder, Batcher, asyncio.Task]:
    """A started batcher (no batch wait) whose device holds `first` until the encoder's gate is set."""
    encoder = encoder or FakeEncoder()
    encoder.gate.clear()
    batcher = Batcher(encoder, max_wait_ms=0, **kwargs)
    batcher.start()
    task = asyncio.create_task(batcher.submit(first))
    assert await asyncio.to_thread(encoder.entered.wait, 5)  # the device has taken it
    return encoder, batcher, task


async def queued(batcher: Batcher, rows: int) -> None:
    """Until `rows` image rows wait in the batcher's queue (the loop's own state, not a sleep)."""
    while batcher.depth < rows:
        await asyncio.sleep(0)


def run(coro):
    return run_bounded(coro, 20)


def test_concurrent_requests_share_encoder_calls_and_get_their_own_rows():
    async def main():
        encoder = FakeEncoder()
        batcher = Batcher(encoder, max_batch=64, max_wait_ms=300)
        batcher.start()
        withdraws = [batcher.expect() for _ in range(8)]  # eight requests decoding at once

        async def request(i):
            await asyncio.sleep(0.01 * i)
            withdraws[i]()
            return await batcher.submit(items(i, i + 100))

        results = await asyncio.gather(*(request(i) for i in range(8)))
        await batcher.stop()
        return encoder, batcher, results

    encoder, batcher, results = run(main())
    assert batcher.calls < 8 and len(encoder.batches) == batcher.calls
    for i, rows in enumerate(results):
        assert rows.view(-1).tolist() == [10 * i, 10 * (i + 100)]


def test_the_device_thread_waits_for_the_device_and_hands_back_cpu_features():
    async def main():
        batcher = Batcher(lambda pixels: (pixels * 10).as_subclass(DeviceFeatures), max_wait_ms=0)
        batcher.start()
        results = await asyncio.gather(batcher.submit(items(1, 2)), batcher.submit(items(3)))
        await batcher.stop()
        return batcher, results

    DeviceFeatures.copied_in.clear()
    batcher, results = run(main())
    assert len(DeviceFeatures.copied_in) == batcher.calls
    assert all(name.startswith("fer-device") for name in DeviceFeatures.copied_in)
    assert [type(rows) for rows in results] == [torch.Tensor, torch.Tensor]
    assert [rows.view(-1).tolist() for rows in results] == [[10.0, 20.0], [30.0]]


def test_a_job_larger_than_a_batch_is_split_and_reassembled_in_order():
    async def main():
        encoder = FakeEncoder()
        batcher = Batcher(encoder, max_batch=4, max_wait_ms=0)
        batcher.start()
        result = await batcher.submit(items(*range(10)))
        await batcher.stop()
        return encoder, result

    encoder, result = run(main())
    assert [len(b) for b in encoder.batches] == [4, 4, 2]
    assert result.view(-1).tolist() == [10 * i for i in range(10)]


def test_a_failing_batch_fails_only_its_requests_and_the_batcher_serves_on():
    async def main():
        # The device holds [0] so the next jobs queue up and batch as [1, 666], [3].
        encoder, batcher, first = await held_device(items(0), FakeEncoder(poison=666), max_batch=2)
        jobs = [asyncio.create_task(batcher.submit(items(v))) for v in (1, 666, 3)]
        await queued(batcher, 3)
        encoder.gate.set()
        outcomes = await asyncio.gather(first, *jobs, return_exceptions=True)
        after = await batcher.submit(items(7))
        await batcher.stop()
        return encoder, outcomes, after

    encoder, outcomes, after = run(main())
    assert encoder.batches[:3] == [[0], [1, 666], [3]]
    assert isinstance(outcomes[1], BatchFailed) and isinstance(outcomes[2], BatchFailed)
    assert outcomes[0].item() == 0 and outcomes[3].item() == 30
    assert after.item() == 70


def test_text_work_runs_on_the_device_thread_taking_turns_with_image_batches():
    async def main():
        done = []
        tasks = []
        encoder, batcher, running = await held_device(items(0), max_batch=1)
        for i in range(3):  # while the device is held, three texts and three images wait
            tasks.append(
                asyncio.create_task(
                    batcher.run(
                        lambda i=i: done.append(("text", i)) or threading.current_thread().name, items=1
                    )
                )
            )
            tasks.append(asyncio.create_task(batcher.submit(items(10 + i))))
        await queued(batcher, 3)
        encoder.gate.set()
        results = await asyncio.gather(running, *tasks)
        await batcher.stop()
        return encoder, done, results

    encoder, done, results = run(main())
    text_threads = [r for r in results if isinstance(r, str)]
    assert text_threads and all(name.startswith("fer-device") for name in text_threads)
    assert encoder.batches == [[0], [10], [11], [12]]
    assert done == [("text", 0), ("text", 1), ("text", 2)]


def test_image_batches_and_text_work_alternate_so_neither_starves():
    async def main():
        order = []
        stats = BatchStats(
            on_batch=lambda n, s: order.append("image"), on_task=lambda n, s: order.append("text")
        )
        encoder, batcher, running = await held_device(items(0), max_batch=1, stats=stats)
        texts = [asyncio.create_task(batcher.run(lambda: None, items=1)) for _ in range(4)]
        images = [asyncio.create_task(batcher.submit(items(i))) for i in range(1, 5)]
        await queued(batcher, 4)
        encoder.gate.set()
        await asyncio.gather(running, *texts, *images)
        await batcher.stop()
        return order

    order = run(main())
    # after the held image call: text, image, text, image... (text had the next turn)
    assert order == ["image", "text", "image", "text", "image", "text", "image", "text", "image"]


def test_a_disconnected_client_is_dropped_before_reaching_the_encoder(monkeypatch):
    monkeypatch.setattr(service.batcher, "POLL_S", 0.01)

    async def main():
        encoder, batcher, busy = await held_device(items(1), max_batch=1)
        gone = asyncio.Event()

        async def is_disconnected():
            return gone.is_set()

        waiting = asyncio.create_task(batcher.submit(items(2), is_disconnected))
        await queued(batcher, 1)
        gone.set()
        with pytest.raises(ClientGone):
            await waiting
        assert batcher.depth == 0
        encoder.gate.set()
        await busy
        await batcher.submit(items(3))
        await batcher.stop()
        return encoder

    encoder = run(main())
    assert encoder.batches == [[1], [3]]


def test_no_waiting_when_no_other_request_is_coming():
    async def main():
        batcher = Batcher(FakeEncoder(), max_batch=64, max_wait_ms=10_000)
        batcher.start()
        await asyncio.wait_for(batcher.submit(items(1)), 2)  # would take 10 s if it waited for the deadline
        await batcher.stop()

    run(main())


def test_constructor_checks_say_what_to_do():
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(FakeEncoder(), max_batch=0)


def test_stop_fails_jobs_the_device_holds_as_well_as_queued_ones():
    async def main():
        encoder, batcher, held = await held_device(items(1), max_batch=1)
        waiting = asyncio.create_task(batcher.submit(items(2)))
        await queued(batcher, 1)
        await batcher.stop()
        outcomes = await asyncio.wait_for(asyncio.gather(held, waiting, return_exceptions=True), 2)
        encoder.gate.set()
        return outcomes

    outcomes = run(main())
    assert all(isinstance(o, BatchFailed) for o in outcomes)


def test_stop_fails_a_text_task_the_device_is_running():
    """Its caller gets BatchFailed instead of waiting for a result that will never come."""

    async def main():
        batcher = Batcher(FakeEncoder(), max_wait_ms=0)
        batcher.start()
        entered, gate = threading.Event(), threading.Event()

        def encode_texts():
            entered.set()
            gate.wait(10)
            return "features"

        caller = asyncio.create_task(batcher.run(encode_texts, items=3))
        assert await asyncio.to_thread(entered.wait, 5)  # the device thread runs it
        await batcher.stop()
        try:
            return await asyncio.wait_for(asyncio.gather(caller, return_exceptions=True), 2)
        finally:
            gate.set()

    (outcome,) = run(main())
    assert isinstance(outcome, BatchFailed), outcome


def test_a_small_request_does_not_wait_behind_every_queued_frame():
    """Batches take one row from each waiting job in turn, the jobs served going to the back."""

    async def main():
        encoder, batcher, running = await held_device(items(0), max_batch=4)
        clips = [asyncio.create_task(batcher.submit(items(*range(100 * c, 100 * c + 6)))) for c in (1, 2, 3)]
        await queued(batcher, 18)
        image = asyncio.create_task(batcher.submit(items(7)))
        await queued(batcher, 19)
        encoder.gate.set()
        await asyncio.gather(running, image, *clips)
        await batcher.stop()
        return encoder

    encoder = run(main())
    assert encoder.batches[1] == [100, 200, 300, 7]  # the image in the first batch after the held one
    assert encoder.batches[2] == [101, 102, 201, 301]  # then the clips in turn (a job's rows side by side)
    assert sorted(v for b in encoder.batches[1:] for v in b) == sorted(
        [7, *range(100, 106), *range(200, 206), *range(300, 306)]
    )
