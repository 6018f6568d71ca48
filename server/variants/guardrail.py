"""The guardrail: roll a model back to its original variant when live agreement with it falls.

It watches the top-1 agreement of shadow comparisons between the original and the compressed variant
over a sliding window of images. Below ``guardrail.min_agreement`` (after ``min_samples`` images) it
makes the original the default, logs why, and counts the rollback. The compressed variant stays loaded
and compared, so an operator can see whether agreement recovers and promote it again by hand
(:meth:`Guardrail.override`), optionally pinning the choice so the guardrail leaves it alone.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import numpy as np

from compression.models.names import ORIGINAL
from server.config.settings import GuardrailSettings
from server.observability.metrics import ShadowMetrics
from server.variants.registry import COMPRESSED_ALIAS, ModelRegistry, ServedModel

log = logging.getLogger("slimserve.guardrail")


@dataclass(frozen=True)
class GuardrailState:
    default_variant: str
    pinned: bool
    window_agreement: float | None
    """None until an image has been compared."""
    window_samples: int
    rollbacks: int
    last_rollback_reason: str


class Guardrail:
    def __init__(
        self, model: ServedModel, settings: GuardrailSettings, registry: ModelRegistry, metrics: ShadowMetrics
    ) -> None:
        self._model = model
        self._settings = settings
        self._registry = registry
        self._metrics = metrics
        self._window: deque[bool] = deque(maxlen=settings.window)
        self._agreeing = 0
        self.pinned = False
        self.rollbacks = 0
        self.last_rollback_reason = ""
        metrics.min_agreement.labels(model.name).set(settings.min_agreement)
        metrics.pinned.labels(model.name).set(0)

    @property
    def window_agreement(self) -> float | None:
        return self._agreeing / len(self._window) if self._window else None

    def state(self) -> GuardrailState:
        return GuardrailState(
            self._model.default_variant,
            self.pinned,
            self.window_agreement,
            len(self._window),
            self.rollbacks,
            self.last_rollback_reason,
        )

    def observe(self, agree: np.ndarray) -> None:
        """Record the agreement of images compared between the original and the compressed variant."""
        for value in agree.tolist():
            if len(self._window) == self._window.maxlen:
                self._agreeing -= self._window[0]
            self._window.append(value)
            self._agreeing += value
        rate = self.window_agreement
        self._metrics.window_agreement.labels(self._model.name).set(rate if rate is not None else 1.0)
        self._metrics.window_samples.labels(self._model.name).set(len(self._window))
        self._check(rate)

    def override(self, variant: str, pin: bool) -> GuardrailState:
        """An operator's choice: make ``variant`` the default ("" keeps the current one) and pin it or not."""
        if variant:
            chosen = self._model.resolve(variant).name
            if chosen != self._model.default_variant:
                self._registry.set_default(self._model, chosen)
                self._reset_window()
        self.pinned = pin
        self._metrics.pinned.labels(self._model.name).set(1 if pin else 0)
        log.info(
            "model %r: operator set the default variant to %r (%s)",
            self._model.name,
            self._model.default_variant,
            "pinned" if pin else "guardrail active",
        )
        return self.state()

    def _check(self, rate: float | None) -> None:
        settings = self._settings
        compressed = self._model.aliases.get(COMPRESSED_ALIAS)
        if compressed is not None:
            self._metrics.rollbacks.labels(self._model.name, compressed)  # the series exists (at 0) before any rollback
        if (
            not settings.enabled
            or self.pinned
            or rate is None
            or compressed is None
            or self._model.default_variant != compressed
            or len(self._window) < settings.min_samples
            or rate >= settings.min_agreement
        ):
            return
        self.rollbacks += 1
        self.last_rollback_reason = (
            f"live top-1 agreement {rate:.3f} over the last {len(self._window)} compared images is below "
            f"guardrail.min_agreement {settings.min_agreement}"
        )
        self._metrics.rollbacks.labels(self._model.name, compressed).inc()
        self._registry.set_default(self._model, ORIGINAL)
        self._reset_window()
        log.warning(
            "model %r: rolled back from %r to the original: %s", self._model.name, compressed, self.last_rollback_reason
        )

    def _reset_window(self) -> None:
        """A new default starts with a fresh window, so old comparisons do not judge it (nor show on the gauges)."""
        self._window.clear()
        self._agreeing = 0
        self._metrics.window_agreement.labels(self._model.name).set(1.0)
        self._metrics.window_samples.labels(self._model.name).set(0)
