"""Choosing the variant to serve from measured figures and the budget. Pure: no models, no timing."""

from __future__ import annotations

from dataclasses import dataclass

from compression.models.names import ORIGINAL
from compression.search.settings import BudgetSettings


@dataclass(frozen=True)
class Measured:
    """What selection needs to know of one variant (the original included)."""

    name: str
    latency_p95_ms: float
    top1: float | None
    top1_drop: float | None
    agreement: float


@dataclass(frozen=True)
class Choice:
    name: str
    reason: str
    budget_met: bool
    """False when nothing met the latency budget and ``on_unmet`` picked a fallback."""


class BudgetUnmet(Exception):
    """No variant meets the budget and the config says to fail the deploy."""


def meets_accuracy(variant: Measured, budget: BudgetSettings) -> bool:
    if variant.name == ORIGINAL:
        return True
    if budget.max_accuracy_drop is not None:
        if variant.top1_drop is None or variant.top1_drop > budget.max_accuracy_drop:
            return False
    if budget.min_agreement is not None and variant.agreement < budget.min_agreement:
        return False
    return True


def meets_latency(variant: Measured, budget: BudgetSettings) -> bool:
    return budget.max_latency_ms is None or variant.latency_p95_ms <= budget.max_latency_ms


def _fidelity_key(variant: Measured) -> float:
    return variant.top1 if variant.top1 is not None else variant.agreement


def choose(variants: list[Measured], budget: BudgetSettings) -> Choice:
    """Pick per ``budget.objective``; a variant outside the accuracy budget is never chosen."""
    accurate = [v for v in variants if meets_accuracy(v, budget)]
    within = [v for v in accurate if meets_latency(v, budget)]
    fastest = lambda pool: min(pool, key=lambda v: (v.latency_p95_ms, -_fidelity_key(v)))  # noqa: E731
    if accurate == [v for v in variants if v.name == ORIGINAL] and len(variants) > 1:
        if not within and budget.on_unmet == "fail":
            raise BudgetUnmet(
                "no compressed candidate is within the accuracy budget, and the original misses "
                f"p95 <= {budget.max_latency_ms} ms; on_unmet is 'fail'"
            )
        return Choice(
            ORIGINAL, "no compressed candidate is within the accuracy budget; serving the original", bool(within)
        )
    if within:
        if budget.objective == "fastest":
            best = fastest(within)
            return Choice(best.name, f"fastest of {len(within)} variants within the budget", True)
        best = max(within, key=lambda v: (_fidelity_key(v), -v.latency_p95_ms))
        return Choice(best.name, f"most accurate of {len(within)} variants within the budget", True)
    limit = f"p95 <= {budget.max_latency_ms} ms"
    if budget.on_unmet == "fail":
        raise BudgetUnmet(f"no variant meets both the accuracy budget and {limit}; on_unmet is 'fail'")
    if budget.on_unmet == "original":
        return Choice(
            ORIGINAL,
            f"BUDGET UNMET: no variant meets {limit} within the accuracy budget; "
            "on_unmet='original' serves the original",
            False,
        )
    best = fastest(accurate)
    return Choice(
        best.name,
        f"BUDGET UNMET: no variant meets {limit} within the accuracy budget; "
        f"on_unmet='best_accuracy' serves the fastest within the accuracy budget "
        f"({best.latency_p95_ms:.2f} ms)",
        False,
    )
