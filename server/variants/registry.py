"""The served models and their variants (the original and, once compressed, the chosen variant).

Servicers resolve ``(model name, version)`` here. A model's default variant can be swapped
atomically: requests already queued on the old variant finish there, new ones go to the new one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from enum import Enum

from compression.models.images import ImagePreprocessor
from compression.models.names import ORIGINAL
from protos.errors import NotFound, Unavailable
from server.batching.batcher import BatchRecord, DynamicBatcher, Forward
from server.config.settings import ModelSettings
from server.observability.metrics import ServerMetrics
from server.observability.stats import InferenceStats
from server.variants.policy import Decision, LatencyTable, ServingPolicy, predicted_latency_s

log = logging.getLogger("slimserve.registry")

COMPRESSED_ALIAS = "compressed"
"""Always names the chosen compressed variant, whatever its chain is called."""
DEFAULT_VERSION = ""
"""The version that means "the model's default variant"."""


@dataclass
class Variant:
    name: str
    version: str
    """Triton-style numeric version ("1" = the original, "2" = the compressed variant): clients such as
    perf_analyzer parse versions as integers. Requests may also name the variant."""
    batcher: DynamicBatcher
    stats: InferenceStats = field(default_factory=InferenceStats)
    properties: dict[str, str] = field(default_factory=dict)
    """Figures shown in ModelConfig parameters (techniques, measured latency, accuracy)."""
    latency: LatencyTable = field(default_factory=LatencyTable)
    """Forward-pass seconds per batch size: seeded at warm-up, updated by every batch it runs."""


Decided = Callable[[str, Decision], None]
"""Told (model name, decision) whenever the serving policy picks a variant."""


@dataclass
class ServedModel:
    settings: ModelSettings
    labels: list[str]
    input_shape: tuple[int, int, int]
    num_classes: int
    preprocessor: ImagePreprocessor
    variants: dict[str, Variant] = field(default_factory=dict)
    default_variant: str = ORIGINAL
    """The variant the deploy chose (the compressed one once promoted; the original again after a rollback or
    an operator's override). The ``compressed`` policy answers with it."""
    aliases: dict[str, str] = field(default_factory=dict)
    policy: ServingPolicy | None = None
    """The ``original`` or ``adaptive`` serving policy; None = ``compressed`` (answer with ``default_variant``)."""
    on_decision: Decided | None = None

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def max_batch_size(self) -> int:
        return self.settings.batching.max_batch_size

    def has_version(self, version: str) -> bool:
        if version == DEFAULT_VERSION:
            return bool(self.variants)  # NOTE: without asking the serving policy (a probe is not a request)
        return self._find(version) is not None

    def resolve(self, version: str) -> Variant:
        """The variant a request for ``version`` goes to: the default, or one pinned by number or name."""
        variant = self._find(version)
        if variant is None:
            known = ", ".join(f"{v.version!r} or {v.name!r}" for v in self.variants.values())
            raise NotFound(f"model {self.name!r} has no version {version!r}; use '' for the default, {known}")
        return variant

    def _find(self, version: str) -> Variant | None:
        if version == DEFAULT_VERSION:
            if self.policy is not None:
                return self._by_policy()
            return self.variants.get(self.default_variant)
        name = self.aliases.get(version, version)
        if name in self.variants:
            return self.variants[name]
        return next((v for v in self.variants.values() if v.version == version), None)

    def _by_policy(self) -> Variant:
        assert self.policy is not None
        compressed = self.aliases.get(COMPRESSED_ALIAS)
        original = self.variants[ORIGINAL]
        # NOTE: +1: the request being routed; the rows it brings are not known yet at this point.
        queued = sum(variant.batcher.queued_rows for variant in self.variants.values()) + 1
        busy = not all(variant.batcher.idle for variant in self.variants.values())
        decision = self.policy.choose(
            time.monotonic(),
            compressed,
            held_by_guardrail=compressed is not None and self.default_variant != compressed,
            original_latency_s=predicted_latency_s(original.latency, queued, self.max_batch_size, busy),
        )
        if self.on_decision is not None:
            self.on_decision(self.name, decision)
        return self.variants[decision.variant]


class ModelState(str, Enum):
    """A model's place in its life, as ``RepositoryIndex`` reports it."""

    LOADING = "LOADING"
    COMPRESSING = "COMPRESSING"
    """Serving the original while the compression search runs."""
    READY = "READY"
    UNLOADING = "UNLOADING"
    FAILED = "FAILED"


@dataclass(frozen=True)
class Status:
    state: ModelState
    reason: str = ""


class ModelRegistry:
    def __init__(self, metrics: ServerMetrics, executor: Executor) -> None:
        self._models: dict[str, ServedModel] = {}
        self._metrics = metrics
        self._executor = executor
        self.statuses: dict[str, Status] = {}
        """Every model the server knows of, served or not (loading, failed), by name."""

    def add_model(self, model: ServedModel) -> ServedModel | None:
        """Serve ``model``; returns the model it replaces (same name), which new requests no longer reach."""
        serving = model.settings.serving
        slo_s = serving.slo_p95_ms / 1000 if serving.slo_p95_ms is not None else None
        if slo_s is not None:
            self._metrics.serving_slo.labels(model.name).set(slo_s)
        if serving.policy != "compressed":
            model.policy = ServingPolicy(serving.policy, slo_s, serving.return_below, serving.min_hold_s, ORIGINAL)
            model.on_decision = self._record_decision
        previous = self._models.get(model.name)
        self._models[model.name] = model
        return previous

    def set_status(self, name: str, state: ModelState, reason: str = "") -> None:
        self.statuses[name] = Status(state, reason)
        log.info("model %r: %s%s", name, state.value, f" ({reason})" if reason else "")

    def remove_model(self, name: str) -> ServedModel:
        """Stop routing requests to ``name`` (they get NOT_FOUND) and hand it back for draining."""
        model = self.get(name)
        del self._models[name]
        return model

    def get(self, name: str) -> ServedModel:
        try:
            return self._models[name]
        except KeyError:
            status = self.statuses.get(name)
            if status is not None and status.state is ModelState.UNLOADING:
                raise Unavailable(f"model {name!r} is being unloaded") from None
            if status is not None and status.state in (ModelState.LOADING, ModelState.FAILED):
                why = f": {status.reason}" if status.reason else ""
                raise Unavailable(f"model {name!r} is {status.state.value.lower()}{why}") from None
            known = ", ".join(sorted(self._models)) or "none"
            raise NotFound(f"unknown model {name!r}; this server serves: {known}") from None

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def add_variant(
        self,
        model: ServedModel,
        name: str,
        forward: Forward,
        properties: dict[str, str] | None = None,
        warm_timings: dict[int, float] | None = None,
    ) -> Variant:
        """Start a batcher for ``forward`` and make it addressable as version ``name``; ``warm_timings``
        (forward seconds per batch size, from the warm-up) seed its latency table."""
        batching = model.settings.batching
        stats = InferenceStats()
        latency = LatencyTable(dict(warm_timings or {}))
        batcher = DynamicBatcher(
            forward,
            self._executor,
            max_batch_size=batching.max_batch_size,
            max_queue_delay_s=batching.max_queue_delay_ms / 1000,
            max_queue_size=batching.max_queue_size,
            on_batch=self._batch_recorder(model.name, name, stats, latency),
        )
        batcher.start()
        variant = Variant(name, str(len(model.variants) + 1), batcher, stats, properties or {}, latency)
        model.variants[name] = variant
        self._metrics.variant_info.labels(model.name, name).info(
            {"version": variant.version, "device": model.settings.device}
        )
        self._metrics.set_active(model.name, list(model.variants), model.default_variant)
        return variant

    def promote_compressed(
        self,
        model: ServedModel,
        name: str,
        forward: Forward,
        properties: dict[str, str] | None = None,
        warm_timings: dict[int, float] | None = None,
    ) -> Variant:
        """Add the compressed variant ``name``, address it also as "compressed", and make it the default."""
        variant = self.add_variant(model, name, forward, properties, warm_timings)
        model.aliases[COMPRESSED_ALIAS] = name
        self.set_default(model, name)
        return variant

    def set_default(self, model: ServedModel, name: str) -> None:
        """Atomically route new default-version requests to variant ``name`` (a name, version or alias)."""
        name = model.resolve(name).name
        previous, model.default_variant = model.default_variant, name
        self._metrics.set_active(model.name, list(model.variants), name)
        log.info("model %r now answers with variant %r (was %r)", model.name, name, previous)

    async def stop(self) -> None:
        """Let every batcher finish its queued work."""
        for model in self._models.values():
            await drain(model)

    def _record_decision(self, model: str, decision: Decision) -> None:
        self._metrics.policy_decisions.labels(model, decision.variant, decision.reason.value).inc()

    def _batch_recorder(
        self, model: str, variant: str, stats: InferenceStats, latency: LatencyTable
    ) -> Callable[[BatchRecord], None]:
        def record(batch: BatchRecord) -> None:
            stats.record_batch(batch)
            latency.record(batch.batch_size, batch.compute_seconds)
            self._metrics.record_batch(model, variant, batch)

        return record


async def drain(model: ServedModel) -> None:
    """Finish the work queued on every variant of ``model``, then stop its batchers."""
    for variant in model.variants.values():
        await variant.batcher.stop()
