"""The served models and their variants (the original and, once compressed, the chosen variant).

Servicers resolve ``(model name, version)`` here. A model's default variant can be swapped
atomically: requests already queued on the old variant finish there, new ones go to the new one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from compression.models.images import ImagePreprocessor
from compression.models.names import ORIGINAL
from protos.errors import NotFound
from server.batching.batcher import BatchRecord, DynamicBatcher, Forward
from server.config.settings import ModelSettings
from server.observability.metrics import ServerMetrics
from server.observability.stats import InferenceStats

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


@dataclass
class ServedModel:
    settings: ModelSettings
    labels: list[str]
    input_shape: tuple[int, int, int]
    num_classes: int
    preprocessor: ImagePreprocessor
    variants: dict[str, Variant] = field(default_factory=dict)
    default_variant: str = ORIGINAL
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def max_batch_size(self) -> int:
        return self.settings.batching.max_batch_size

    def has_version(self, version: str) -> bool:
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
            return self.variants.get(self.default_variant)
        name = self.aliases.get(version, version)
        if name in self.variants:
            return self.variants[name]
        return next((v for v in self.variants.values() if v.version == version), None)


class ModelRegistry:
    def __init__(self, metrics: ServerMetrics, executor: Executor) -> None:
        self._models: dict[str, ServedModel] = {}
        self._metrics = metrics
        self._executor = executor

    def add_model(self, model: ServedModel) -> None:
        self._models[model.name] = model

    def get(self, name: str) -> ServedModel:
        try:
            return self._models[name]
        except KeyError:
            known = ", ".join(sorted(self._models)) or "none"
            raise NotFound(f"unknown model {name!r}; this server serves: {known}") from None

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def add_variant(
        self, model: ServedModel, name: str, forward: Forward, properties: dict[str, str] | None = None
    ) -> Variant:
        """Start a batcher for ``forward`` and make it addressable as version ``name``."""
        batching = model.settings.batching
        stats = InferenceStats()
        batcher = DynamicBatcher(
            forward,
            self._executor,
            max_batch_size=batching.max_batch_size,
            max_queue_delay_s=batching.max_queue_delay_ms / 1000,
            max_queue_size=batching.max_queue_size,
            on_batch=self._batch_recorder(model.name, name, stats),
        )
        batcher.start()
        variant = Variant(name, str(len(model.variants) + 1), batcher, stats, properties or {})
        model.variants[name] = variant
        self._metrics.variant_info.labels(model.name, name).info(
            {"version": variant.version, "device": model.settings.device}
        )
        self._metrics.set_active(model.name, list(model.variants), model.default_variant)
        return variant

    def promote_compressed(
        self, model: ServedModel, name: str, forward: Forward, properties: dict[str, str] | None = None
    ) -> Variant:
        """Add the compressed variant ``name``, address it also as "compressed", and make it the default."""
        variant = self.add_variant(model, name, forward, properties)
        model.aliases[COMPRESSED_ALIAS] = name
        self.set_default(model, name)
        return variant

    def set_default(self, model: ServedModel, name: str) -> None:
        """Atomically route new default-version requests to variant ``name``."""
        model.resolve(name)
        previous, model.default_variant = model.default_variant, name
        self._metrics.set_active(model.name, list(model.variants), name)
        log.info("model %r now answers with variant %r (was %r)", model.name, name, previous)

    async def stop(self) -> None:
        """Let every batcher finish its queued work."""
        for model in self._models.values():
            for variant in model.variants.values():
                await variant.batcher.stop()

    def _batch_recorder(self, model: str, variant: str, stats: InferenceStats) -> Callable[[BatchRecord], None]:
        def record(batch: BatchRecord) -> None:
            stats.record_batch(batch)
            self._metrics.record_batch(model, variant, batch)

        return record
