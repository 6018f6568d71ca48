"""Live shadow comparison: a sample of answered requests also runs on the model's other variant.

Off the hot path: a request's response never waits for its shadow run. Sampled inputs wait in a
bounded queue and run only while every variant of the model is idle, so a caller that arrives during a
shadow pass waits at most one pass of ``shadow.max_batch_size`` rows (larger requests are compared on
their first rows), and passes take at most ``shadow.max_compute_share`` of the wall-clock time; when
the queue is full the sample is dropped and counted. Each compared image adds
to a top-1 agree/disagree counter and to a histogram of the Jensen-Shannon divergence between the two
output distributions, and feeds the model's :class:`~server.variants.guardrail.Guardrail`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from compression.models.names import ORIGINAL
from protos.tensors import softmax
from server.config.settings import ShadowSettings
from server.observability.metrics import ShadowMetrics
from server.variants.guardrail import Guardrail
from server.variants.registry import COMPRESSED_ALIAS, ServedModel, Variant

log = logging.getLogger("slimserve.shadow")


@dataclass(frozen=True)
class _Sample:
    served: Variant
    shadow: Variant
    inputs: np.ndarray
    outputs: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.inputs.shape[0])


def agreement_and_divergence(logits_a: np.ndarray, logits_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: whether the top-1 classes agree, and the Jensen-Shannon divergence in bits (0..1)."""
    p, q = softmax(logits_a.astype(np.float64)), softmax(logits_b.astype(np.float64))
    mean = (p + q) / 2

    def kl_to_mean(x: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(x > 0, x * np.log2(x / mean), 0.0)
        return terms.sum(axis=1)

    divergence = np.clip((kl_to_mean(p) + kl_to_mean(q)) / 2, 0.0, 1.0)
    return p.argmax(axis=1) == q.argmax(axis=1), divergence


class ShadowComparer:
    """One per served model: samples its requests, reruns them on the other variant when idle, compares."""

    def __init__(
        self,
        model: ServedModel,
        settings: ShadowSettings,
        guardrail: Guardrail,
        metrics: ShadowMetrics,
        executor: Executor,
    ) -> None:
        self._model = model
        self._settings = settings
        self.guardrail = guardrail
        self._metrics = metrics
        self._executor = executor
        self._samples: deque[_Sample] = deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._random = random.Random()
        self._next_pass_at = 0.0
        """perf_counter time before which no shadow pass starts (``shadow.max_compute_share``)."""
        self._pending_gauge = metrics.pending.labels(model.name)
        for reason in ("busy", "error"):
            metrics.dropped.labels(model.name, reason)  # series at 0, so rates and alerts see them

    def start(self) -> None:
        if self._task is None and self._settings.fraction > 0:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"shadow-{self._model.name}")

    async def stop(self) -> None:
        """Stop comparing; samples still queued are discarded (no caller waits for them)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def offer(self, served: Variant, inputs: np.ndarray, outputs: np.ndarray) -> None:
        """Called after ``served`` answered a request: maybe queue it for comparison. Never blocks."""
        if self._task is None or self._random.random() >= self._settings.fraction:
            return
        shadow = self._counterpart(served)
        if shadow is None:
            return
        if len(self._samples) >= self._settings.max_pending:
            self._metrics.dropped.labels(self._model.name, "busy").inc()
            return
        rows = self._settings.max_batch_size  # a large request is compared on its first rows only
        self._samples.append(_Sample(served, shadow, inputs[:rows], outputs[:rows]))
        self._pending_gauge.set(len(self._samples))
        self._arrived.set()

    def _counterpart(self, served: Variant) -> Variant | None:
        """The original for a compressed answer; the compressed variant (if any) for an original one."""
        other = self._model.aliases.get(COMPRESSED_ALIAS) if served.name == ORIGINAL else ORIGINAL
        return self._model.variants.get(other) if other else None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._samples:
                self._arrived.clear()
                await self._arrived.wait()
            await asyncio.sleep(max(0.0, self._next_pass_at - time.perf_counter()))
            await self._model_idle()
            samples = [self._samples.popleft()]
            while self._samples and self._fits(samples, self._samples[0]):
                samples.append(self._samples.popleft())
            self._pending_gauge.set(len(self._samples))
            inputs = np.concatenate([s.inputs for s in samples])
            started = time.perf_counter()
            try:
                shadow_outputs = await loop.run_in_executor(self._executor, samples[0].shadow.batcher.run_now, inputs)
            except Exception:
                log.exception("model %r: shadow run on %r failed", self._model.name, samples[0].shadow.name)
                self._metrics.dropped.labels(self._model.name, "error").inc(len(samples))
                continue
            finally:
                took = time.perf_counter() - started
                self._next_pass_at = started + took / self._settings.max_compute_share
            self._record(samples, np.concatenate([s.outputs for s in samples]), shadow_outputs)

    def _fits(self, samples: list[_Sample], candidate: _Sample) -> bool:
        same_pair = candidate.served is samples[0].served and candidate.shadow is samples[0].shadow
        return same_pair and sum(s.rows for s in samples) + candidate.rows <= self._settings.max_batch_size

    async def _model_idle(self) -> None:
        """Wait until no variant of this model has work queued or running."""
        while busy := [v for v in self._model.variants.values() if not v.batcher.idle]:
            await busy[0].batcher.wait_idle()

    def _record(self, samples: list[_Sample], served_outputs: np.ndarray, shadow_outputs: np.ndarray) -> None:
        served, shadow = samples[0].served.name, samples[0].shadow.name
        agree, divergence = agreement_and_divergence(served_outputs, shadow_outputs)
        agreeing = int(agree.sum())
        counter = self._metrics.comparisons
        counter.labels(self._model.name, served, shadow, "agree").inc(agreeing)
        counter.labels(self._model.name, served, shadow, "disagree").inc(len(agree) - agreeing)
        histogram = self._metrics.divergence.labels(self._model.name, served, shadow)
        for value in divergence.tolist():
            histogram.observe(value)
        self.guardrail.observe(agree)
