"""Request logic shared by both gRPC services: resolve the variant, batch, infer, account.

Servicers only convert protos; everything a request does between parsing and serialising is here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import grpc
import numpy as np

from protos.errors import InvalidArgument, ServingError
from protos.tensors import softmax, top_k_indices
from server.batching.batcher import BatchResult
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

    def bind(self, model: ServedModel, variant: Variant) -> None:
        self.model, self.variant = model.name, variant
        self._inflight_labels = (model.name, variant.name)
        self.metrics.inflight.labels(*self._inflight_labels).inc()

    def finish(self, code: grpc.StatusCode) -> None:
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
    def __init__(self, registry: ModelRegistry, metrics: ServerMetrics, decode_pool: Executor) -> None:
        self.registry = registry
        self.metrics = metrics
        self._decode_pool = decode_pool
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
        track.result = await variant.batcher.submit(inputs)
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
        rows = await self._decode(model, images)
        chunk = model.max_batch_size
        parts = [rows[i : i + chunk] for i in range(0, len(rows), chunk)]
        track.enqueued = time.perf_counter()
        results = await asyncio.gather(*(variant.batcher.submit(part) for part in parts))
        track.result = results[0]
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
