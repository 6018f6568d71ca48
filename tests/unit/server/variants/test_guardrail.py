"""The guardrail on a real registry: sliding agreement window, no verdict before ``min_samples``, rollback to
the original below ``min_agreement``, operator override and pinning, and the Prometheus series it keeps."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from torch import nn

from compression.models.images import ImagePreprocessor
from compression.models.names import ORIGINAL
from compression.models.settings import BuiltinSource, PreprocessingSettings
from protos.errors import NotFound
from server.config.settings import GuardrailSettings, ModelSettings
from server.observability.metrics import ServerMetrics
from server.variants.guardrail import Guardrail
from server.variants.registry import ModelRegistry, ServedModel

CHAIN = "int8-tiny"
PRE = PreprocessingSettings(channels=1, resize=8, crop=8, mean=(0.5,), std=(0.5,))


@dataclass
class Served:
    registry: ModelRegistry
    model: ServedModel
    metrics: ServerMetrics

    def guardrail(self, **settings: object) -> Guardrail:
        options = {"window": 10, "min_samples": 5, "min_agreement": 0.8, **settings}
        return Guardrail(self.model, GuardrailSettings(**options), self.registry, self.metrics.shadow)

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, {"model": "tiny", **labels})


@pytest.fixture
def served() -> Iterator[Served]:
    """A model serving a compressed variant (version 2) as its default, next to the original (version 1)."""
    loop = asyncio.new_event_loop()
    executor = ThreadPoolExecutor(1)
    metrics = ServerMetrics(CollectorRegistry())
    registry = ModelRegistry(metrics, executor)
    settings = ModelSettings(name="tiny", source=BuiltinSource(), labels=list("abcd"), preprocessing=PRE)
    model = ServedModel(settings, list("abcd"), (1, 8, 8), 4, ImagePreprocessor(PRE, 10_000))
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 4)).eval()

    async def build() -> None:
        registry.add_model(model)
        registry.add_variant(model, ORIGINAL, net)
        registry.promote_compressed(model, CHAIN, net)

    loop.run_until_complete(build())
    yield Served(registry, model, metrics)
    loop.run_until_complete(registry.stop())
    loop.close()
    executor.shutdown()


def agree(n: int) -> np.ndarray:
    return np.ones(n, dtype=bool)


def disagree(n: int) -> np.ndarray:
    return np.zeros(n, dtype=bool)


def test_no_verdict_before_min_samples_then_rollback_to_the_original(served: Served) -> None:
    guard = served.guardrail()
    guard.observe(disagree(4))
    assert served.model.default_variant == CHAIN and guard.rollbacks == 0
    assert guard.state().window_samples == 4 and guard.window_agreement == 0.0

    guard.observe(disagree(1))  # the fifth compared image: a verdict
    state = guard.state()
    assert state.default_variant == ORIGINAL and state.rollbacks == 1
    assert "agreement 0.000 over the last 5 compared images" in state.last_rollback_reason
    assert "min_agreement 0.8" in state.last_rollback_reason
    assert state.window_samples == 0 and state.window_agreement is None  # the original starts a fresh window
    assert served.sample("slimserve_guardrail_window_samples") == 0  # and the gauges say so at once
    assert served.sample("slimserve_guardrail_window_agreement_ratio") == 1.0
    assert served.sample("slimserve_guardrail_rollbacks_total", variant=CHAIN) == 1
    assert served.sample("slimserve_variant_active", variant=ORIGINAL) == 1
    assert served.sample("slimserve_variant_active", variant=CHAIN) == 0
    assert served.model.resolve("").name == ORIGINAL
    assert served.model.resolve("compressed").name == CHAIN  # still loaded and addressable


def test_agreement_at_the_threshold_keeps_the_compressed_variant(served: Served) -> None:
    guard = served.guardrail(window=10, min_samples=10, min_agreement=0.8)
    guard.observe(np.array([True] * 8 + [False] * 2))
    assert guard.window_agreement == pytest.approx(0.8)
    assert served.model.default_variant == CHAIN
    assert served.sample("slimserve_guardrail_window_agreement_ratio") == pytest.approx(0.8)
    assert served.sample("slimserve_guardrail_window_samples") == 10
    assert served.sample("slimserve_guardrail_rollbacks_total", variant=CHAIN) == 0  # the series exists at 0

    guard.observe(disagree(1))  # an agreement slides out, a disagreement enters: 7 of 10
    assert served.model.default_variant == ORIGINAL and guard.rollbacks == 1


def test_the_window_slides_so_old_disagreements_stop_counting(served: Served) -> None:
    guard = served.guardrail(window=10, min_samples=10)
    guard.observe(disagree(2))
    guard.observe(agree(8))
    assert guard.window_agreement == pytest.approx(0.8) and served.model.default_variant == CHAIN
    guard.observe(agree(2))  # the two disagreements slide out
    assert guard.window_agreement == 1.0 and guard.state().window_samples == 10


def test_no_rollback_while_the_original_already_serves(served: Served) -> None:
    guard = served.guardrail()
    guard.observe(disagree(5))
    guard.observe(disagree(10))
    assert guard.rollbacks == 1
    assert served.sample("slimserve_guardrail_rollbacks_total", variant=CHAIN) == 1


def test_a_pinned_choice_is_left_alone_until_unpinned(served: Served) -> None:
    guard = served.guardrail()
    state = guard.override("", pin=True)
    assert state.pinned and state.default_variant == CHAIN
    assert served.sample("slimserve_variant_pinned") == 1
    guard.observe(disagree(10))
    assert served.model.default_variant == CHAIN and guard.rollbacks == 0

    assert not guard.override("", pin=False).pinned
    assert served.sample("slimserve_variant_pinned") == 0
    guard.observe(disagree(1))  # the window still holds the pinned period's disagreements
    assert served.model.default_variant == ORIGINAL and guard.rollbacks == 1


def test_override_switches_by_name_version_or_alias_and_starts_a_fresh_window(served: Served) -> None:
    guard = served.guardrail()
    guard.observe(np.array([True, False, True]))
    assert guard.override("1", pin=False).default_variant == ORIGINAL
    assert guard.state().window_samples == 0
    assert guard.override("compressed", pin=True).default_variant == CHAIN
    assert served.sample("slimserve_variant_active", variant=CHAIN) == 1
    assert guard.override(ORIGINAL, pin=False).default_variant == ORIGINAL


def test_override_to_an_unknown_variant_changes_nothing(served: Served) -> None:
    guard = served.guardrail()
    with pytest.raises(NotFound, match="no version '7'"):
        guard.override("7", pin=True)
    assert served.model.default_variant == CHAIN and not guard.pinned


def test_a_disabled_guardrail_never_rolls_back(served: Served) -> None:
    guard = served.guardrail(enabled=False)
    guard.observe(disagree(10))
    assert served.model.default_variant == CHAIN and guard.rollbacks == 0
    assert guard.window_agreement == 0.0  # still measured and exported
    assert served.sample("slimserve_guardrail_min_agreement_ratio") == pytest.approx(0.8)
