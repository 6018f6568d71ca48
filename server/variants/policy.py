"""Which variant answers: the serving policy of one model (``serving.policy`` in its deploy config).

``compressed`` (the default) answers with the compressed variant once it is chosen; ``original`` always
with the original; ``adaptive`` with the original while the model's latency objective holds, and with
the compressed variant when the queue in front of the original would push a request past
``serving.slo_p95_ms``. The prediction uses each variant's forward-pass time per batch size, learnt
from the batches it runs (seeded at warm-up), and the rows queued for the model. Hysteresis keeps it
from flapping: it moves back to the original only when the original's predicted latency is under
``serving.return_below`` of the objective, and not sooner than ``serving.min_hold_s`` after the last
move. The guardrail keeps its authority: while it holds the original, nothing else answers.

Pure: no clocks, threads or metrics here; the registry feeds it and asks it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

EWMA_WEIGHT = 0.2
"""Weight of the newest batch in a variant's forward-time estimate for its batch size."""


class Reason(str, Enum):
    """Why the policy answered with the variant it did (a label of ``slimserve_policy_decisions_total``)."""

    POLICY = "policy"
    """``compressed`` or ``original`` policy: fixed."""
    NO_COMPRESSED = "no_compressed"
    """No compressed variant (yet): the original answers."""
    GUARDRAIL = "guardrail"
    """The guardrail (or an operator) holds the original."""
    SLO_OK = "slo_ok"
    """Adaptive: the original meets the objective with the queue as it is."""
    SLO_RISK = "slo_risk"
    """Adaptive: the original would miss the objective; the compressed variant answers."""
    HOLD = "hold"
    """Adaptive: the original would fit again, but not yet with margin or not for long enough."""


@dataclass(frozen=True)
class Decision:
    variant: str
    reason: Reason


@dataclass
class LatencyTable:
    """One variant's forward-pass seconds per batch size: measured where seen, interpolated elsewhere."""

    seconds: dict[int, float] = field(default_factory=dict)

    def record(self, batch_size: int, seconds: float) -> None:
        known = self.seconds.get(batch_size)
        self.seconds[batch_size] = seconds if known is None else known + EWMA_WEIGHT * (seconds - known)

    def forward_s(self, batch_size: int) -> float | None:
        """The estimate for ``batch_size``: linear between the nearest measured sizes, proportional beyond them;
        None before any measurement."""
        if not self.seconds:
            return None
        if batch_size in self.seconds:
            return self.seconds[batch_size]
        sizes = sorted(self.seconds)
        below = [s for s in sizes if s < batch_size]
        above = [s for s in sizes if s > batch_size]
        if below and above:
            low, high = below[-1], above[0]
            share = (batch_size - low) / (high - low)
            return self.seconds[low] + share * (self.seconds[high] - self.seconds[low])
        nearest = below[-1] if below else above[0]
        return self.seconds[nearest] * batch_size / nearest


def predicted_latency_s(table: LatencyTable, queued_rows: int, max_batch_size: int, busy: bool) -> float | None:
    """Seconds until a request arriving now is answered by this variant, if ``queued_rows`` rows (this one
    included) wait for it: the batch running now (``busy``; counted whole, as if it had just started), then
    full batches of the rows ahead, then its own batch. None before any measurement."""
    rows = max(1, queued_rows)
    batches = math.ceil(rows / max_batch_size)
    full = table.forward_s(max_batch_size)
    last = table.forward_s(rows - (batches - 1) * max_batch_size)
    if full is None or last is None:
        return None
    running = (full if queued_rows > max_batch_size else last) if busy else 0.0
    return running + (batches - 1) * full + last


@dataclass
class ServingPolicy:
    """The per-model rule. ``choose`` is called once per request that does not pin a variant."""

    policy: str
    slo_s: float | None
    return_below: float
    min_hold_s: float
    original: str
    current: str = ""
    changed_at: float = -math.inf

    def __post_init__(self) -> None:
        self.current = self.current or self.original

    def choose(
        self,
        now: float,
        compressed: str | None,
        held_by_guardrail: bool,
        original_latency_s: float | None,
    ) -> Decision:
        """The variant to answer with. ``compressed`` is the compressed variant's name (None: none yet);
        ``original_latency_s`` the original's predicted latency with the model's current queue."""
        if compressed is None:
            return self._move(Decision(self.original, Reason.NO_COMPRESSED), now)
        if held_by_guardrail:
            return self._move(Decision(self.original, Reason.GUARDRAIL), now)
        if self.policy == "compressed":
            return self._move(Decision(compressed, Reason.POLICY), now)
        if self.policy == "original" or self.slo_s is None:
            return self._move(Decision(self.original, Reason.POLICY), now)
        if original_latency_s is None:
            return self._move(Decision(self.original, Reason.SLO_OK), now)  # NOTE: nothing measured yet
        if self.current == self.original:
            if original_latency_s > self.slo_s:
                return self._move(Decision(compressed, Reason.SLO_RISK), now)
            return Decision(self.original, Reason.SLO_OK)
        fits_with_margin = original_latency_s <= self.return_below * self.slo_s
        if fits_with_margin and now - self.changed_at >= self.min_hold_s:
            return self._move(Decision(self.original, Reason.SLO_OK), now)
        return Decision(compressed, Reason.HOLD if original_latency_s <= self.slo_s else Reason.SLO_RISK)

    def _move(self, decision: Decision, now: float) -> Decision:
        if decision.variant != self.current:
            self.current, self.changed_at = decision.variant, now
        return decision
