"""Honest selection: a lossy variant is within the accuracy budget only when its interval shows it, on the
selection images and then on the confirmation images; lossless variants need no interval; one class that
loses too much rejects a variant under ``max_class_drop``. The figures are inputs to pure functions."""

from __future__ import annotations

import numpy as np
import pytest

from compression.search.accuracy import class_drops, evidence, z_value
from compression.search.selection import Evidence, Measured, accuracy_verdict, choose
from compression.search.settings import BudgetSettings

BUDGET = BudgetSettings(max_accuracy_drop=1.0)


def shown(drop: float, upper: float, images: int = 100, needed: int | None = None) -> Evidence:
    return Evidence(images, drop, upper, 0.99, 0.95, needed)


EXACT = Evidence(100, 0.0, 0.0, 1.0, 0.96)
ORIGINAL = Measured("original", 10.0, 0.9, 0.0, 1.0, EXACT, EXACT)
LOSSLESS = Measured("onnxruntime-fp32", 5.0, 0.9, 0.0, 1.0, EXACT, EXACT, lossless=True)


def lossy(name: str, latency: float, selection: Evidence, confirmation: Evidence, **kwargs: object) -> Measured:
    return Measured(name, latency, 0.9, selection.top1_drop, 0.98, selection, confirmation, **kwargs)  # type: ignore[arg-type]


def test_an_interval_that_crosses_the_budget_loses_to_a_lossless_variant() -> None:
    """The issue's case: drop 0.0 with +-2.8 points passes a 1-point budget on the point estimate only."""
    int8 = lossy("int8", 4.0, shown(0.0, 2.8, needed=800), shown(0.0, 2.8, needed=800))
    choice = choose([ORIGINAL, LOSSLESS, int8], BUDGET)
    assert choice.name == "onnxruntime-fp32" and choice.budget_met
    assert "selection: drop +0.00 pt, upper bound +2.80 pt > 1.0 pt" in (accuracy_verdict(int8, BUDGET) or "")
    assert choice.images_needed == 1600 and "about 1600 validation images would be needed" in choice.reason
    # the point estimate alone (the old rule) would have chosen it
    point = Measured("int8", 4.0, 0.9, 0.0, 0.98)
    assert choose([ORIGINAL, LOSSLESS, point], BUDGET).name == "int8"


def test_a_shown_drop_is_within_the_budget() -> None:
    int8 = lossy("int8", 4.0, shown(0.1, 0.7), shown(0.2, 0.9))
    choice = choose([ORIGINAL, LOSSLESS, int8], BUDGET)
    assert choice.name == "int8" and choice.unconfirmed == () and choice.images_needed is None


def test_the_confirmation_rejects_a_choice_that_only_passed_on_the_selection_images() -> None:
    lucky = lossy("pruned", 2.0, shown(0.0, 0.8), shown(1.5, 2.6))
    honest = lossy("int8", 4.0, shown(0.2, 0.9), shown(0.1, 0.8))
    choice = choose([ORIGINAL, LOSSLESS, lucky, honest], BUDGET)
    assert choice.name == "int8" and choice.unconfirmed == ("pruned",)
    assert "pruned passed on the selection images but failed confirmation" in choice.reason
    assert (accuracy_verdict(lucky, BUDGET) or "").startswith("failed confirmation: confirmation: drop +1.50 pt")


def test_when_every_lossy_variant_fails_confirmation_a_lossless_one_is_served() -> None:
    lucky = lossy("pruned", 2.0, shown(0.0, 0.8, needed=300), shown(1.5, 2.6))
    choice = choose([ORIGINAL, LOSSLESS, lucky], BUDGET)
    assert choice.name == "onnxruntime-fp32" and choice.unconfirmed == ("pruned",)


def test_max_class_drop_rejects_a_variant_that_hurts_one_class() -> None:
    hurts = lossy("int8", 4.0, shown(0.1, 0.7), shown(0.2, 0.9), worst_class_drop=("3", 6.0))
    assert choose([ORIGINAL, LOSSLESS, hurts], BUDGET).name == "int8"  # no class limit: within budget
    limited = BudgetSettings(max_accuracy_drop=1.0, max_class_drop=5.0)
    assert accuracy_verdict(hurts, limited) == "class 3 loses 6.00 pt > max_class_drop 5.0 pt"
    assert choose([ORIGINAL, LOSSLESS, hurts], limited).name == "onnxruntime-fp32"


def test_agreement_budget_is_judged_by_its_lower_bound() -> None:
    budget = BudgetSettings(max_accuracy_drop=None, min_agreement=0.97)
    close = Evidence(100, None, None, 0.98, 0.93)
    variant = Measured("int8", 4.0, None, None, 0.98, close, close)
    assert "lower bound 0.9300 < 0.97" in (accuracy_verdict(variant, budget) or "")


def test_evidence_bounds_do_not_collapse_without_disagreement() -> None:
    labels = np.arange(200) % 10
    exact = evidence(labels, labels, labels, confidence=0.95, max_drop=1.0, min_agreement=None)
    assert exact.top1_drop == 0.0 and 0.5 < exact.top1_drop_upper < 1.5  # about z/(n+2) = 0.81 points
    assert exact.agreement == 1.0 and exact.agreement_lower < 1.0
    point = evidence(labels, labels, labels, confidence=0.0, max_drop=1.0, min_agreement=None)
    assert point.top1_drop_upper == 0.0  # confidence 0: the point estimate


def test_evidence_of_the_issue_case_needs_more_images() -> None:
    """200 images, 94.5% agreement, drop 0.5: the one-sided 95% bound is about 3.3 points; a 1-point budget
    needs thousands of images."""
    labels = np.arange(200) % 10
    candidate = labels.copy()
    original = labels.copy()
    candidate[:6] = (labels[:6] + 1) % 10  # six images the candidate loses ...
    original[6:11] = (labels[6:11] + 1) % 10  # ... and five it gains; agreement 189/200 = 94.5%
    found = evidence(candidate, original, labels, confidence=0.95, max_drop=1.0, min_agreement=None)
    assert found.agreement == pytest.approx(0.945) and found.top1_drop == pytest.approx(0.5)
    assert found.top1_drop_upper == pytest.approx(3.3, abs=0.2)
    stricter = evidence(candidate, original, labels, confidence=0.975, max_drop=1.0, min_agreement=None)
    assert stricter.top1_drop_upper == pytest.approx(3.7, abs=0.3)  # the two-sided 95% interval's upper end
    assert found.images_needed is not None and 3000 < found.images_needed < 10000


def test_class_drops_are_per_label() -> None:
    labels = np.array([0] * 10 + [1] * 10)
    candidate = labels.copy()
    candidate[10:13] = 0  # three of class 1 lost
    drops = class_drops(candidate, labels, labels)
    assert drops == {"0": (10, 0.0), "1": (10, 30.0)}


def test_confidence_is_a_one_sided_level() -> None:
    assert z_value(0.95) == pytest.approx(1.645, abs=1e-3) and z_value(0.975) == pytest.approx(1.960, abs=1e-3)
    assert z_value(0.0) == 0.0 and z_value(0.5) == 0.0
    with pytest.raises(ValueError, match=r"one-sided level: 0 \(point estimates\) or in \[0.5, 1\), not 0.3"):
        BudgetSettings(confidence=0.3)
