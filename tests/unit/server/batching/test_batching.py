"""The dynamic batcher with a real (tiny) torch model on a real executor thread."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from protos.errors import InvalidArgument, ResourceExhausted
from server.batching.batcher import BatchRecord, DynamicBatcher


class SlowDouble(torch.nn.Module):
    """Doubles its input after ``delay`` seconds, and remembers the batch sizes it saw."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.seen: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.gate.wait(5)
        self.seen.append(x.shape[0])
        if self.delay:
            threading.Event().wait(self.delay)
        return x.flatten(1) * 2


def run(coroutine):  # type: ignore[no-untyped-def]
    return asyncio.run(coroutine)


def make(model: torch.nn.Module, records: list[BatchRecord] | None = None, **kwargs: object) -> DynamicBatcher:
    options = {"max_batch_size": 8, "max_queue_delay_s": 0.0, "max_queue_size": 100, **kwargs}
    return DynamicBatcher(
        model, ThreadPoolExecutor(1), on_batch=(records if records is not None else []).append, **options
    )  # type: ignore[arg-type]


def test_each_caller_gets_its_own_rows_and_batches_form_under_load() -> None:
    model = SlowDouble(delay=0.02)
    records: list[BatchRecord] = []

    async def scenario() -> None:
        batcher = make(model, records)
        batcher.start()
        inputs = [np.full((1 + i % 3, 2), i, np.float32) for i in range(20)]
        results = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        for x, result in zip(inputs, results):
            np.testing.assert_array_equal(result.outputs, x * 2)
        await batcher.stop()

    run(scenario())
    assert sum(model.seen) == sum(1 + i % 3 for i in range(20))
    assert max(model.seen) > 1 and all(size <= 8 for size in model.seen)
    assert len(records) == len(model.seen) and all(r.succeeded for r in records)


def test_idle_model_runs_a_lone_request_at_once() -> None:
    model = SlowDouble()

    async def scenario() -> float:
        batcher = make(model, max_queue_delay_s=0.0)
        batcher.start()
        result = await batcher.submit(np.ones((1, 2), np.float32))
        await batcher.stop()
        return result.queue_seconds

    assert run(scenario()) < 0.25  # no batching delay (a 0.5 s delay would show); slack for a busy machine
    assert model.seen == [1]


def test_queue_delay_gathers_a_fuller_batch() -> None:
    model = SlowDouble()

    async def scenario() -> None:
        batcher = make(model, max_queue_delay_s=0.2)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(np.ones((1, 2), np.float32)))
        await asyncio.sleep(0.02)
        await asyncio.gather(first, batcher.submit(np.ones((2, 2), np.float32)))
        await batcher.stop()

    run(scenario())
    assert model.seen == [3]


def test_full_queue_is_refused_and_oversize_batches_rejected() -> None:
    model = SlowDouble()
    model.gate.clear()  # the model blocks until released, so requests pile up

    async def scenario() -> None:
        batcher = make(model, max_queue_size=2)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(np.ones((1, 2), np.float32)))
        await asyncio.sleep(0.05)  # now inside the model
        queued = [asyncio.ensure_future(batcher.submit(np.ones((1, 2), np.float32))) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(ResourceExhausted, match="queue is full"):
            await batcher.submit(np.ones((1, 2), np.float32))
        with pytest.raises(InvalidArgument, match="batch size 9"):
            await batcher.submit(np.ones((9, 2), np.float32))
        model.gate.set()
        await asyncio.gather(running, *queued)  # nothing accepted is dropped
        await batcher.stop()

    run(scenario())
    assert sum(model.seen) == 3


def test_cancelled_requests_are_skipped_and_failures_reach_every_caller() -> None:
    model = SlowDouble()
    model.gate.clear()

    async def scenario() -> None:
        batcher = make(model)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(np.ones((1, 2), np.float32)))
        await asyncio.sleep(0.05)
        abandoned = asyncio.ensure_future(batcher.submit(np.ones((4, 2), np.float32)))
        kept = asyncio.ensure_future(batcher.submit(np.ones((2, 2), np.float32)))
        await asyncio.sleep(0.01)
        abandoned.cancel()
        model.gate.set()
        await asyncio.gather(running, kept)
        await batcher.stop()

    run(scenario())
    assert model.seen == [1, 2]  # the cancelled request's 4 rows never ran

    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("kaput")

    async def failing() -> None:
        batcher = make(Broken())
        batcher.start()
        results = await asyncio.gather(
            *(batcher.submit(np.ones((1, 2), np.float32)) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, RuntimeError) and "kaput" in str(r) for r in results)
        await batcher.stop()

    run(failing())


def test_queue_delay_waits_only_for_as_many_rows_as_the_last_batch_ran() -> None:
    model = SlowDouble()

    async def submit_spread(batcher: DynamicBatcher, rows: list[int]) -> list[float]:
        tasks = []
        for n in rows:
            tasks.append(asyncio.ensure_future(batcher.submit(np.ones((n, 2), np.float32))))
            await asyncio.sleep(0.02)
        return [r.queue_seconds for r in await asyncio.gather(*tasks)]

    async def scenario() -> list[float]:
        batcher = make(model, max_queue_delay_s=0.5)
        batcher.start()
        await submit_spread(batcher, [1, 2])  # before any batch: waits for a full one, gets 3 rows
        await submit_spread(batcher, [1, 2])  # 3 rows again: runs as soon as they are there
        await submit_spread(batcher, [1])  # the group shrank: one wait, then batches of 1 ...
        lone = await submit_spread(batcher, [1])  # ... run at once
        await batcher.stop()
        return lone

    assert run(scenario())[0] < 0.25  # not delayed (a 0.5 s wait would show); slack for a busy machine
    assert model.seen == [3, 3, 1, 1]
