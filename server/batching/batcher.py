"""Dynamic batching: concurrent requests for one variant share a forward pass.

Policy: when the model is idle, whatever is queued runs at once (no added latency at low load);
while a batch runs, new requests queue up and form the next batch, up to ``max_batch_size`` rows.
``max_queue_delay_ms`` > 0 additionally waits up to that long, when fewer rows are queued than the
last batch ran, for that many: under steady concurrent load batches fill, while a lone client (last
batch: its one request) is never delayed. The forward pass runs on an executor thread, never on the
event loop. Requests whose callers went away (cancelled or past their deadline) are dropped before
they reach the model.

Tracing (server/observability/tracing.py): a request submitted with a :class:`TraceLink` is traced;
each forward pass serving at least one such request is one ``forward`` span, a child of the first of
them and linked to all, whose context comes back in :attr:`BatchResult.batch_span`. Untraced batches
(tracing off: every batch) do no tracing work.
"""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
import torch
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanContext, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue

from protos.errors import InvalidArgument, ResourceExhausted, Unavailable

log = logging.getLogger("slimserve.batching")

Forward = Callable[[torch.Tensor], torch.Tensor]

# NOTE: request tensors are read-only views of the gRPC message (zero-copy); models do not write to
# their inputs, so torch's one-time warning about non-writable arrays is noise here.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


@dataclass(frozen=True)
class BatchResult:
    outputs: np.ndarray
    """This request's rows of the model's output."""
    queue_seconds: float
    compute_seconds: float
    batch_size: int
    """Rows in the forward pass that served this request (shared with other requests)."""
    batch_span: SpanContext | None = None
    """The forward pass's span, when the request was traced (for a link from the request's own spans)."""


@dataclass(frozen=True)
class TraceLink:
    """What a traced request tells its batch: the tracer to record the batch with, its span, and the
    attributes the batch span copies (model, variant)."""

    tracer: Tracer
    context: SpanContext
    attributes: Mapping[str, AttributeValue]


BATCH_SIZE = "slimserve.batch.size"
"""Span attribute: rows in the forward pass (on ``forward``, and on the request and ``queue`` spans it served)."""
BATCH_REQUESTS = "slimserve.batch.requests"
"""Span attribute: requests the forward pass served."""


@dataclass(frozen=True)
class BatchRecord:
    """What one forward pass did, for metrics and statistics."""

    batch_size: int
    requests: int
    compute_seconds: float
    """Batch assembly + forward + output conversion, on the inference thread."""
    succeeded: bool


@dataclass
class _Pending:
    inputs: np.ndarray
    future: asyncio.Future[BatchResult]
    link: TraceLink | None = None
    enqueued_at: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """Gathers requests for one model variant into batches and runs them off the event loop."""

    def __init__(
        self,
        forward: Forward,
        executor: Executor,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        on_batch: Callable[[BatchRecord], None] = lambda record: None,
    ) -> None:
        self._forward = forward
        self._executor = executor
        self._max_batch_size = max_batch_size
        self._max_queue_delay_s = max_queue_delay_s
        self._max_queue_size = max_queue_size
        self._on_batch = on_batch
        self._pending: deque[_Pending] = deque()
        self._queued_rows = 0
        self._expected_rows = max_batch_size
        """Rows worth waiting for: as many as the last batch ran (a full batch before the first)."""
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._traced = False
        """A traced request was ever submitted: until then (tracing off: always) batches skip tracing entirely."""

    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def queued_rows(self) -> int:
        """Rows waiting for a batch (the batch running now not included)."""
        return sum(pending.inputs.shape[0] for pending in self._pending)

    @property
    def idle(self) -> bool:
        return self._idle.is_set()

    def run_now(self, inputs: np.ndarray) -> np.ndarray:
        """Run ``inputs`` through the model on the calling thread, bypassing the queue and its accounting
        (shadow comparisons call this on the inference thread)."""
        return self._forward_rows([inputs])

    async def wait_idle(self) -> None:
        """Return once nothing is queued or running (background work such as shadow runs waits for this)."""
        await self._idle.wait()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="dynamic-batcher")

    async def stop(self) -> None:
        """Finish everything already queued, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def submit(self, inputs: np.ndarray, link: TraceLink | None = None) -> BatchResult:
        """Queue ``inputs`` (rows, ...) and wait for this request's outputs; with ``link``, the request is traced."""
        rows = inputs.shape[0]
        if not 1 <= rows <= self._max_batch_size:
            raise InvalidArgument(f"batch size {rows} is outside 1..{self._max_batch_size} (max_batch_size)")
        if self._closing:
            raise Unavailable("the server is shutting down")
        if len(self._pending) >= self._max_queue_size:
            raise ResourceExhausted(
                f"inference queue is full ({self._max_queue_size} requests waiting); retry after a short backoff"
            )
        pending = _Pending(inputs, asyncio.get_running_loop().create_future(), link)
        if link is not None:
            self._traced = True
        self._pending.append(pending)
        self._queued_rows += rows
        self._idle.clear()
        self._wakeup.set()
        return await pending.future

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                if self._max_queue_delay_s > 0 and self._queued_rows < self._expected_rows:
                    await self._wait_for_fuller_batch()
                batch = self._take_batch()
                if batch:
                    self._expected_rows = sum(p.inputs.shape[0] for p in batch)
                    await self._execute(batch)
            self._idle.set()
            if self._closing and not self._pending:
                return

    async def _wait_for_fuller_batch(self) -> None:
        deadline = self._pending[0].enqueued_at + self._max_queue_delay_s
        while self._queued_rows < self._expected_rows and not self._closing:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        rows = 0
        while self._pending:
            head = self._pending[0]
            if head.future.done():  # caller cancelled or timed out: skip its work
                self._pending.popleft()
                self._queued_rows -= head.inputs.shape[0]
                continue
            if rows + head.inputs.shape[0] > self._max_batch_size:
                break
            self._pending.popleft()
            self._queued_rows -= head.inputs.shape[0]
            rows += head.inputs.shape[0]
            batch.append(head)
        return batch

    async def _execute(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        span = _batch_span(batch) if self._traced and any(p.link is not None for p in batch) else None
        batch_span = span.get_span_context() if span is not None else None
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(self._executor, self._forward_rows, [p.inputs for p in batch])
        except Exception as exc:  # noqa: BLE001 - every caller of this batch must hear about it
            log.exception("forward pass failed for a batch of %d requests", len(batch))
            if span is not None:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                span.end()
            self._on_batch(
                BatchRecord(sum(p.inputs.shape[0] for p in batch), len(batch), time.perf_counter() - started, False)
            )
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        compute = time.perf_counter() - started
        if span is not None:
            span.end()
        self._on_batch(BatchRecord(outputs.shape[0], len(batch), compute, True))
        offset = 0
        for pending in batch:
            rows = pending.inputs.shape[0]
            if not pending.future.done():
                pending.future.set_result(
                    BatchResult(
                        outputs[offset : offset + rows],
                        started - pending.enqueued_at,
                        compute,
                        outputs.shape[0],
                        batch_span if pending.link is not None else None,
                    )
                )
            offset += rows

    def _forward_rows(self, inputs: list[np.ndarray]) -> np.ndarray:
        """Runs on the inference thread: stack rows, run the model, return a numpy array."""
        stacked = inputs[0] if len(inputs) == 1 else np.concatenate(inputs)
        batch = torch.from_numpy(stacked)
        with torch.inference_mode():
            outputs = self._forward(batch)
        return outputs.detach().to("cpu", torch.float32).numpy()


def _batch_span(batch: list[_Pending]) -> Span:
    """The ``forward`` span of a batch with traced requests: one per batch, since a batch serves many requests;
    a child of the first traced one (so it is sampled whenever a request in it is) and linked to each."""
    traced = [p.link for p in batch if p.link is not None]
    first = traced[0]
    attributes = {
        **first.attributes,
        BATCH_SIZE: sum(p.inputs.shape[0] for p in batch),
        BATCH_REQUESTS: len(batch),
    }
    return first.tracer.start_span(
        "forward",
        context=trace.set_span_in_context(trace.NonRecordingSpan(first.context)),
        links=[Link(t.context) for t in traced],
        attributes=attributes,
    )
