"""The batcher's ``forward`` span: one per batch with traced requests, a child of the first, linked to each;
untraced batches (tracing off) record nothing."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from server.batching.batcher import BATCH_REQUESTS, BATCH_SIZE, DynamicBatcher, TraceLink


def traced() -> tuple[InMemorySpanExporter, TracerProvider]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter, provider


def make(forward: object = lambda x: x * 2) -> DynamicBatcher:
    # NOTE: a queue delay, so that requests submitted together share one batch
    return DynamicBatcher(
        forward,  # type: ignore[arg-type]
        ThreadPoolExecutor(1),
        max_batch_size=8,
        max_queue_delay_s=0.2,
        max_queue_size=100,
    )


def test_one_forward_span_per_batch_linked_to_each_traced_request() -> None:
    exporter, provider = traced()
    tracer = provider.get_tracer("test")
    requests = [tracer.start_span(f"request {i}") for i in range(3)]
    attributes = {"slimserve.model": "m", "slimserve.variant": "v"}

    async def scenario() -> list:
        batcher = make()
        batcher.start()
        links = [TraceLink(tracer, span.get_span_context(), attributes) for span in requests]
        inputs = [np.ones((1 + i % 2, 2), np.float32) for i in range(4)]
        # three traced requests and one untraced, all in one batch
        results = await asyncio.gather(*(batcher.submit(x, link) for x, link in zip(inputs, [*links, None])))
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    forwards = [s for s in exporter.get_finished_spans() if s.name == "forward"]
    assert len(forwards) == 1
    forward = forwards[0]
    assert forward.parent is not None and forward.parent.span_id == requests[0].get_span_context().span_id
    assert [link.context.span_id for link in forward.links] == [s.get_span_context().span_id for s in requests]
    assert forward.attributes is not None
    assert forward.attributes[BATCH_SIZE] == 1 + 2 + 1 + 2 and forward.attributes[BATCH_REQUESTS] == 4
    assert forward.attributes["slimserve.model"] == "m" and forward.attributes["slimserve.variant"] == "v"
    assert [r.batch_span for r in results[:3]] == [forward.context] * 3
    assert results[3].batch_span is None  # the untraced request gets no span context


def test_untraced_batches_record_nothing() -> None:
    exporter, provider = traced()

    async def scenario() -> None:
        batcher = make()
        batcher.start()
        result = await batcher.submit(np.ones((2, 2), np.float32))
        assert result.batch_span is None
        await batcher.stop()

    asyncio.run(scenario())
    assert exporter.get_finished_spans() == ()


def test_a_failed_forward_pass_ends_its_span_as_an_error() -> None:
    exporter, provider = traced()
    tracer = provider.get_tracer("test")
    request = tracer.start_span("request")

    def broken(batch: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("out of memory")

    async def scenario() -> None:
        batcher = make(broken)
        batcher.start()
        try:
            await batcher.submit(np.ones((1, 2), np.float32), TraceLink(tracer, request.get_span_context(), {}))
        except RuntimeError:
            pass
        await batcher.stop()

    asyncio.run(scenario())
    (forward,) = exporter.get_finished_spans()
    assert forward.status.status_code is StatusCode.ERROR and "out of memory" in (forward.status.description or "")
    assert [event.name for event in forward.events] == ["exception"]
