"""Choosing a variant from measured figures (the figures here are inputs to a pure function)."""

from __future__ import annotations

import pytest

from compression.search.selection import BudgetUnmet, Measured, choose
from compression.search.settings import BudgetSettings

ORIGINAL = Measured("original", latency_p95_ms=10.0, top1=0.99, top1_drop=0.0, agreement=1.0)
INT8 = Measured("int8", latency_p95_ms=4.0, top1=0.985, top1_drop=0.5, agreement=0.99)
PRUNED = Measured("pruned", latency_p95_ms=2.0, top1=0.97, top1_drop=2.0, agreement=0.97)
COMPILED = Measured("compiled", latency_p95_ms=6.0, top1=0.99, top1_drop=0.0, agreement=1.0)
ALL = [ORIGINAL, INT8, PRUNED, COMPILED]


def test_fastest_within_accuracy_budget_never_exceeds_it() -> None:
    choice = choose(ALL, BudgetSettings(max_accuracy_drop=1.0))
    assert choice.name == "int8" and choice.budget_met  # pruned is faster but drops 2 points


def test_latency_budget_that_only_some_meet_picks_the_fastest_of_them() -> None:
    choice = choose(ALL, BudgetSettings(max_latency_ms=5.0, max_accuracy_drop=1.0))
    assert choice.name == "int8"
    choice = choose(ALL, BudgetSettings(max_latency_ms=7.0, max_accuracy_drop=0.1, objective="fastest"))
    assert choice.name == "compiled"


def test_most_accurate_within_latency_budget() -> None:
    choice = choose(ALL, BudgetSettings(max_latency_ms=7.0, max_accuracy_drop=5.0, objective="most_accurate"))
    assert choice.name == "compiled"  # as accurate as the original, and within 7 ms


def test_impossible_accuracy_budget_serves_the_original_and_says_why() -> None:
    worse = [ORIGINAL, INT8, PRUNED]
    choice = choose(worse, BudgetSettings(max_accuracy_drop=0.0))
    assert choice.name == "original" and "accuracy budget" in choice.reason


def test_min_agreement_budget_without_labels() -> None:
    unlabelled = [Measured(m.name, m.latency_p95_ms, None, None, m.agreement) for m in ALL]
    choice = choose(unlabelled, BudgetSettings(max_accuracy_drop=None, min_agreement=0.98))
    assert choice.name == "int8"


@pytest.mark.parametrize(
    ("on_unmet", "expected"),
    [("best_accuracy", "int8"), ("original", "original"), ("fail", None)],
)
def test_each_on_unmet_behaviour(on_unmet: str, expected: str | None) -> None:
    budget = BudgetSettings(max_latency_ms=1.0, max_accuracy_drop=1.0, on_unmet=on_unmet)  # type: ignore[arg-type]
    if expected is None:
        with pytest.raises(BudgetUnmet, match="on_unmet is 'fail'"):
            choose(ALL, budget)
        return
    choice = choose(ALL, budget)
    assert choice.name == expected and not choice.budget_met and "BUDGET UNMET" in choice.reason


def test_budget_needs_an_accuracy_bound() -> None:
    with pytest.raises(ValueError, match="max_accuracy_drop or min_agreement"):
        BudgetSettings(max_accuracy_drop=None, min_agreement=None)
