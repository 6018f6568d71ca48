"""Request logic shared by both gRPC services: resolve the variant, batch, infer, account.

Servicers only convert protos; everything a request does between parsing and serialising is here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field

import grpc
import numpy as np
from opentelemetry.trace import Link, Span, Tracer
from opentelemetry.util.types import Attributes

from protos.errors import InvalidArgument, ServingError
from protos.tensors import softmax, top_k_indices
from server.batching.batcher import BATCH_SIZE, BatchResult, TraceLink
from server.observability import tracing
from server.observability.metrics import ServerMetrics
from server.variants.registry import ModelRegistry, ServedModel, Variant
from server.variants.shadow import ShadowComparer

log = logging.getLogger("slimserve.dataplane")

DEFAULT_TOP_K = 5


@dataclass
class RequestTrack:
    """Accounting for one request: which variant served it, its timings, and its outcome."""

    metrics: ServerMetrics
    method: str
    on_finish: Callable[[], None]
    started: float = field(default_factory=time.perf_counter)
    model: str = ""
    variant: Variant | None = None
    enqueued: float | None = None
    result: BatchResult | None = None
    _inflight_labels: tuple[str, str] | None = None
    span: Span | None = None
    """The request's server span while tracing records it; None otherwise (tracing off: always), and then
    nothing else is traced for the request."""
    tracer: Tracer | None = None
    answered: float | None = None
    """When the model's outputs were ready: the start of the ``response`` span (traced requests only)."""

    def start_span(self, tracer: Tracer, name: str, carrier: Mapping[str, str], attributes: Attributes) -> None:
        """Trace this request (tracing on): a server span, a child of the caller's ``traceparent`` in ``carrier``."""
        self.tracer = tracer
        self.span = tracing.server_span(tracer, name, carrier, attributes)

    def bind(self, model: ServedModel, variant: Variant) -> None:
        self.model, self.variant = model.name, variant
        self._inflight_labels = (model.name, variant.name)
        self.metrics.inflight.labels(*self._inflight_labels).inc()
        if self.span is not None:
            self.span.set_attributes({tracing.MODEL: model.name, tracing.VARIANT: variant.name})

    def link(self) -> TraceLink | None:
        """What the batcher needs to trace this request's forward pass; None when the request is not traced."""
        if self.span is None or self.tracer is None:
            return None
        variant = self.variant.name if self.variant else ""
        return TraceLink(
            self.tracer, self.span.get_span_context(), {tracing.MODEL: self.model, tracing.VARIANT: variant}
        )

    def record_queue(self, enqueued: float, result: BatchResult) -> None:
        """The ``queue`` child (submit to batch start), linked to the batch's ``forward`` span."""
        if self.span is None or self.tracer is None:
            return
        links = [Link(result.batch_span)] if result.batch_span is not None else None
        tracing.child_span(
            self.tracer,
            self.span,
            "queue",
            enqueued,
            enqueued + result.queue_seconds,
            {BATCH_SIZE: result.batch_size},
            links,
        )

    def finish(self, code: grpc.StatusCode, message: str = "", http_status: int | None = None) -> None:
        """Account for the outcome; a traced request's span gets ``code`` (gRPC) or ``http_status`` (REST)."""
        if self.span is not None:
            self._end_span(code, message, http_status)
        self.on_finish()
        total = time.perf_counter() - self.started
        variant = self.variant.name if self.variant else ""
        self.metrics.requests.labels(self.model, variant, self.method, code.name).inc()
        if self._inflight_labels is not None:
            self.metrics.inflight.labels(*self._inflight_labels).dec()
        if self.variant is None:
            return
        self.metrics.request_duration.labels(self.model, variant, self.method).observe(total)
        if code is not grpc.StatusCode.OK or self.result is None or self.enqueued is None:
            self.variant.stats.record_failure(total)
            return
        queue, infer = self.result.queue_seconds, self.result.compute_seconds
        self.metrics.queue_duration.labels(self.model, variant).observe(queue)
        parse = self.enqueued - self.started
        self.variant.stats.record_success(total, queue, parse, infer, max(0.0, total - parse - queue - infer))

    def _end_span(self, code: grpc.StatusCode, message: str, http_status: int | None) -> None:
        assert self.span is not None and self.tracer is not None
        if self.result is not None:
            self.span.set_attribute(BATCH_SIZE, self.result.batch_size)
        if code is grpc.StatusCode.OK and self.answered is not None:
            tracing.child_span(self.tracer, self.span, "response", self.answered, time.perf_counter())
        tracing.end_server_span(self.span, code, message, http_status)


@dataclass(frozen=True)
class ClassifiedImage:
    classes: list[tuple[str, int, float]]
    """(label, index, softmax score), best first."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message a failed request reports; unexpected errors are logged as INTERNAL."""
    if isinstance(exc, ServingError):
        return exc.code, exc.message
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED, "request cancelled"
    log.error("unexpected error while serving a request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


class DataPlane:
    def __init__(
        self, registry: ModelRegistry, metrics: ServerMetrics, decode_pool: Executor, tracer: Tracer | None = None
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self._decode_pool = decode_pool
        self.tracer = tracer
        """Set while tracing is on (``server.tracing``): the transport then starts a span per request."""
        self.active_requests = 0
        """Requests received and not yet answered (all methods that run inference)."""
        self.shadows: dict[str, ShadowComparer] = {}
        """Per model name: the live comparison of its variants (and its guardrail)."""

    def track(self, method: str) -> RequestTrack:
        """Start accounting for a request; its ``finish`` must be called exactly once."""
        self.active_requests += 1
        return RequestTrack(self.metrics, method, self._finished)

    def _finished(self) -> None:
        self.active_requests -= 1

    def resolve(self, model_name: str, version: str, track: RequestTrack) -> tuple[ServedModel, Variant]:
        model = self.registry.get(model_name)
        variant = model.resolve(version)
        track.bind(model, variant)
        return model, variant

    async def infer(self, variant: Variant, inputs: np.ndarray, track: RequestTrack) -> np.ndarray:
        """Run ``inputs`` (batch, C, H, W) through the variant's batcher; returns its logits."""
        track.enqueued = time.perf_counter()
        if track.span is None:
            track.result = await variant.batcher.submit(inputs)
        else:
            track.result = await variant.batcher.submit(inputs, track.link())
            track.record_queue(track.enqueued, track.result)
            track.answered = time.perf_counter()
        self._offer_shadow(track.model, variant, inputs, track.result.outputs)
        return track.result.outputs

    async def classify(
        self, model: ServedModel, variant: Variant, images: list[bytes], top_k: int, track: RequestTrack
    ) -> list[ClassifiedImage]:
        limit = model.settings.max_images_per_request
        if not images:
            raise InvalidArgument("no images in the request")
        if len(images) > limit:
            raise InvalidArgument(f"{len(images)} images in one request; the limit is {limit}")
        k = min(top_k or DEFAULT_TOP_K, model.num_classes)
        decoding = time.perf_counter()
        rows = await self._decode(model, images)
        chunk = model.max_batch_size
        parts = [rows[i : i + chunk] for i in range(0, len(rows), chunk)]
        track.enqueued = time.perf_counter()
        link = track.link()
        results = await asyncio.gather(*(variant.batcher.submit(part, link) for part in parts))
        track.result = results[0]
        if track.span is not None and track.tracer is not None:
            tracing.child_span(
                track.tracer, track.span, "decode", decoding, track.enqueued, {tracing.IMAGES: len(images)}
            )
            for result in results:
                track.record_queue(track.enqueued, result)
            track.answered = time.perf_counter()
        logits = np.concatenate([r.outputs for r in results]) if len(results) > 1 else results[0].outputs
        self._offer_shadow(model.name, variant, rows, logits)
        scores = softmax(logits)
        return [
            ClassifiedImage([(model.labels[i], int(i), float(row[i])) for i in indices])
            for row, indices in zip(scores, top_k_indices(scores, k))
        ]

    def _offer_shadow(self, model: str, variant: Variant, inputs: np.ndarray, outputs: np.ndarray) -> None:
        shadow = self.shadows.get(model)
        if shadow is None:
            return
        try:
            shadow.offer(variant, inputs, outputs)
        except Exception:  # noqa: BLE001 - the caller's answer is ready; a comparison must never cost it
            log.exception("model %r: could not queue a shadow comparison", model)

    async def _decode(self, model: ServedModel, images: list[bytes]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(
            *(loop.run_in_executor(self._decode_pool, model.preprocessor, data, i) for i, data in enumerate(images))
        )
        return np.stack(decoded)
