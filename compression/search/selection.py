"""Choosing the variant to serve from measured figures and the budget. Pure: no models, no timing.

Honest selection: a lossy variant is within the accuracy budget only when the data show it, i.e. when the
one-sided upper bound of its top-1 drop (at ``budget.confidence``) is within ``max_accuracy_drop`` and the
lower bound of its agreement within ``min_agreement``, on the *selection* images. The choice is
then confirmed on the *confirmation* images, which the choice did not use (the winner's curse: the fastest
of many candidates near the budget's edge is the one whose drop was most likely underestimated); a variant
that fails confirmation is passed over for the next one in the objective's order. Lossless variants (fp32
runtimes that agree with the original on every validation image) need no interval.
"""

from __future__ import annotations

from dataclasses import dataclass

from compression.models.names import ORIGINAL
from compression.search.settings import BudgetSettings

MIN_CLASS_IMAGES = 20
"""``budget.max_class_drop`` judges only classes with at least this many validation images: below it one
image is more than 5 points of the class's top-1, and noise would reject every lossy variant."""
CONFIRMATION = "failed confirmation"


@dataclass(frozen=True)
class Evidence:
    """Fidelity on one part of the validation split (see ``accuracy.evidence``)."""

    images: int
    top1_drop: float | None
    """Points, positive = worse; None without labels."""
    top1_drop_upper: float | None
    """The drop's one-sided upper bound at ``confidence``, in points."""
    agreement: float
    agreement_lower: float
    """The agreement's one-sided lower bound at ``confidence`` (Wilson)."""
    images_needed: int | None = None
    """Images this part would need for the bounds to meet the budget at the observed rates; None: never."""


@dataclass(frozen=True)
class Measured:
    """What selection needs to know of one variant (the original included)."""

    name: str
    latency_p95_ms: float
    top1: float | None
    top1_drop: float | None
    agreement: float
    selection: Evidence | None = None
    """Judged by when given; None: the point figures above are (no split, no interval)."""
    confirmation: Evidence | None = None
    """The choice is confirmed on these images when given."""
    lossless: bool = False
    """Agrees with the original on every validation image and computes in fp32 with exact transforms only."""
    worst_class_drop: tuple[str, float] | None = None
    """(class, points): the largest per-class top-1 drop over classes with >= MIN_CLASS_IMAGES images."""


@dataclass(frozen=True)
class Choice:
    name: str
    reason: str
    budget_met: bool
    """False when nothing met the latency budget and ``on_unmet`` picked a fallback."""
    unconfirmed: tuple[str, ...] = ()
    """Variants ranked ahead of the choice that passed on the selection images but failed confirmation."""
    images_needed: int | None = None
    """When no lossy variant could be shown within the budget though one's point estimate was: about how many
    validation images (both parts) would show the most promising one within it."""


class BudgetUnmet(Exception):
    """No variant meets the budget and the config says to fail the deploy."""


def _evidence_fails(evidence: Evidence, budget: BudgetSettings, part: str) -> str | None:
    if budget.max_accuracy_drop is not None:
        upper = evidence.top1_drop_upper
        if upper is None or upper > budget.max_accuracy_drop:
            shown = "no labels" if upper is None else f"drop {evidence.top1_drop:+.2f} pt, upper bound {upper:+.2f} pt"
            return f"{part}: {shown} > {budget.max_accuracy_drop} pt on {evidence.images} images"
    if budget.min_agreement is not None and evidence.agreement_lower < budget.min_agreement:
        return (
            f"{part}: agreement {evidence.agreement:.4f}, lower bound {evidence.agreement_lower:.4f} "
            f"< {budget.min_agreement} on {evidence.images} images"
        )
    return None


def accuracy_verdict(variant: Measured, budget: BudgetSettings) -> str | None:
    """None when ``variant`` is within the accuracy budget; else why not (a confirmation failure starts with
    :data:`CONFIRMATION`)."""
    if variant.name == ORIGINAL or variant.lossless:
        return None
    if budget.max_class_drop is not None and variant.worst_class_drop is not None:
        label, drop = variant.worst_class_drop
        if drop > budget.max_class_drop:
            return f"class {label} loses {drop:.2f} pt > max_class_drop {budget.max_class_drop} pt"
    if variant.selection is None:
        if budget.max_accuracy_drop is not None:
            if variant.top1_drop is None or variant.top1_drop > budget.max_accuracy_drop:
                return f"top-1 drop {variant.top1_drop} > {budget.max_accuracy_drop} pt"
        if budget.min_agreement is not None and variant.agreement < budget.min_agreement:
            return f"agreement {variant.agreement} < {budget.min_agreement}"
        return None
    failed = _evidence_fails(variant.selection, budget, "selection")
    if failed is not None or variant.confirmation is None:
        return failed
    failed = _evidence_fails(variant.confirmation, budget, "confirmation")
    return None if failed is None else f"{CONFIRMATION}: {failed}"


def meets_accuracy(variant: Measured, budget: BudgetSettings) -> bool:
    return accuracy_verdict(variant, budget) is None


def meets_latency(variant: Measured, budget: BudgetSettings) -> bool:
    return budget.max_latency_ms is None or variant.latency_p95_ms <= budget.max_latency_ms


def _fidelity_key(variant: Measured) -> float:
    return variant.top1 if variant.top1 is not None else variant.agreement


def _rank(variant: Measured, budget: BudgetSettings) -> tuple[float, ...]:
    """The objective's order within the accuracy budget (lower first)."""
    if budget.objective == "most_accurate" and meets_latency(variant, budget):
        return (0, -_fidelity_key(variant), variant.latency_p95_ms)
    return (0 if meets_latency(variant, budget) else 1, variant.latency_p95_ms, -_fidelity_key(variant))


def choose(variants: list[Measured], budget: BudgetSettings) -> Choice:
    """Pick per ``budget.objective``; a variant outside the accuracy budget is never chosen."""
    choice = _choose([v for v in variants if meets_accuracy(v, budget)], variants, budget)
    verdicts = {v.name: accuracy_verdict(v, budget) for v in variants}
    notes = []
    chosen = next(v for v in variants if v.name == choice.name)
    unconfirmed = tuple(
        v.name
        for v in sorted(variants, key=lambda v: _rank(v, budget))
        if (verdicts[v.name] or "").startswith(CONFIRMATION) and _rank(v, budget) < _rank(chosen, budget)
    )
    if unconfirmed:
        notes.append(f"{', '.join(unconfirmed)} passed on the selection images but failed confirmation")
    lossy = [v for v in variants if v.name != ORIGINAL and not v.lossless]
    needed = None
    if lossy and not any(verdicts[v.name] is None for v in lossy):
        promising = [
            v.selection.images_needed
            for v in lossy
            if v.selection is not None and v.selection.images_needed is not None and v.selection.images_needed > 0
        ]
        if promising:
            parts = 2 if any(v.confirmation is not None for v in lossy) else 1
            needed = min(promising) * parts
            notes.append(
                f"the validation images cannot show any lossy variant within the accuracy budget at confidence "
                f"{budget.confidence}; about {needed} validation images would be needed at the observed rates"
            )
    if not notes:
        return choice
    return Choice(choice.name, f"{choice.reason}; {'; '.join(notes)}", choice.budget_met, unconfirmed, needed)


def _choose(accurate: list[Measured], variants: list[Measured], budget: BudgetSettings) -> Choice:
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
