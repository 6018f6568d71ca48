"""The searched pruning frontier (``frontier.py``): per chain, the ratios tried in ratio order, which are within
the accuracy budget, and the strongest of them. Built from ``VariantReport`` objects directly: no models."""

from __future__ import annotations

import json

import pytest

from compression.search.frontier import WITHIN, frontier, strongest_ratio, strongest_ratios
from compression.search.runner import VariantReport

OUTSIDE = "selection: drop +2.40 pt, upper bound +3.90 pt > 1.0 pt on 250 images"


def step(
    ratio: float,
    order: int,
    *,
    chain: str = "pruned",
    verdict: str | None = None,
    error: str | None = None,
    labelled: bool = True,
) -> VariantReport:
    """A measured step of a ratio search: stronger pruning, fewer MACs, faster, less accurate."""
    name = f"{chain}-r{ratio * 100:.0f}-int8-onnxruntime"
    v = VariantReport(name, ["channel_prune", "onnxruntime:int8"], ratio_search=chain, prune_ratio=ratio)
    v.search_step = order
    if error is not None:
        v.error = error
        return v
    drop = ratio * 4
    v.latency_p50_ms, v.latency_p95_ms = 10 * (1 - ratio), 11 * (1 - ratio)
    v.macs = int(50e6 * (1 - ratio) ** 2)
    v.agreement, v.agreement_ci95 = 1 - ratio / 10, (1 - ratio / 10 - 0.01, min(1.0, 1 - ratio / 10 + 0.01))
    v.selection = {"images": 250, "agreement": v.agreement, "agreement_lower": v.agreement - 0.02}
    if labelled:
        v.top1, v.top1_drop, v.top1_drop_ci95 = 0.95 - drop / 100, drop, (drop - 0.8, drop + 0.8)
        v.selection.update(top1_drop=drop, top1_drop_upper=drop + 1.2, images_needed=None)
    v.accuracy_verdict = verdict
    v.meets_accuracy = v.meets_budget = verdict is None
    return v


def searched() -> list[VariantReport]:
    """Bisection's order on 0.1..0.8: 0.45 fails, 0.25 passes, 0.35 passes; a plain candidate in between."""
    return [
        step(0.45, 1, verdict=OUTSIDE),
        VariantReport("int8-onnxruntime", ["onnxruntime:int8"], latency_p95_ms=3.0, top1=0.95, agreement=1.0),
        step(0.25, 2),
        step(0.35, 3),
    ]


def test_points_are_in_ratio_order_with_their_figures() -> None:
    chains = frontier(searched())
    assert list(chains) == ["pruned"]  # the plain candidate is not part of any search
    points = chains["pruned"]
    assert [p["ratio"] for p in points] == [0.25, 0.35, 0.45] and [p["step"] for p in points] == [2, 3, 1]
    first = points[0]
    assert first["variant"] == "pruned-r25-int8-onnxruntime" and first["top1_drop"] == 1.0
    assert first["top1_drop_upper"] == 2.2 and first["agreement_lower"] == first["agreement"] - 0.02
    assert first["latency_p50_ms"] == 7.5 and first["latency_p95_ms"] == 11 * 0.75 and first["macs"] == 28125000
    assert set(first) == {
        "variant", "ratio", "step", "top1", "top1_drop", "top1_drop_upper", "agreement", "agreement_lower",
        "latency_p50_ms", "latency_p95_ms", "macs", "within_accuracy", "verdict", "strongest",
    }  # fmt: skip
    json.dumps(chains)  # plain data, as report.json stores it


def test_within_budget_flags_verdicts_and_the_strongest_ratio() -> None:
    points = frontier(searched())["pruned"]
    assert [p["within_accuracy"] for p in points] == [True, True, False]
    assert [p["verdict"] for p in points] == [WITHIN, WITHIN, OUTSIDE]
    assert [p["strongest"] for p in points] == [False, True, False]
    assert strongest_ratio(points) == 0.35


def test_a_failed_build_is_outside_the_budget_with_its_first_line_as_the_verdict() -> None:
    broken = step(0.8, 4, error="TechniqueError: cannot prune layer conv3\nTraceback ...")
    skipped = step(0.7, 5)
    skipped.skipped, skipped.accuracy_verdict = "not tried: the search's time budget", None
    points = frontier([*searched(), broken, skipped])["pruned"]
    assert points[-1]["ratio"] == 0.8 and not points[-1]["within_accuracy"]
    assert points[-1]["verdict"] == "FAILED: TechniqueError: cannot prune layer conv3"
    assert points[-1]["top1"] is None and points[-1]["top1_drop_upper"] is None
    assert points[-2]["verdict"].startswith("not built: not tried") and not points[-2]["within_accuracy"]
    assert strongest_ratio(points) == 0.35


def test_an_unmeasured_step_is_not_within_the_budget() -> None:
    unmeasured = VariantReport("pruned-r10", ["channel_prune"], ratio_search="pruned", prune_ratio=0.1)
    (point,) = frontier([unmeasured])["pruned"]
    assert not point["within_accuracy"] and point["verdict"] == "not measured" and not point["strongest"]


def test_chains_are_kept_apart_and_one_with_no_ratio_within_the_budget_has_none() -> None:
    variants = [
        *searched(),
        step(0.45, 1, chain="pruned-fp16", verdict=OUTSIDE),
        step(0.25, 2, chain="pruned-fp16", verdict=OUTSIDE),
    ]
    chains = frontier(variants)
    assert list(chains) == ["pruned", "pruned-fp16"]
    assert [p["ratio"] for p in chains["pruned-fp16"]] == [0.25, 0.45]
    assert not any(p["strongest"] for p in chains["pruned-fp16"])
    assert strongest_ratios(chains) == {"pruned": 0.35, "pruned-fp16": None}


def test_without_labels_the_drop_is_absent_and_agreement_judges() -> None:
    (point,) = frontier([step(0.3, 1, labelled=False)])["pruned"]
    assert point["top1"] is None and point["top1_drop"] is None and point["top1_drop_upper"] is None
    assert point["agreement"] == pytest.approx(0.97) and point["within_accuracy"] and point["strongest"]


def test_no_ratio_search_gives_an_empty_frontier() -> None:
    assert frontier([VariantReport("int8", ["onnxruntime:int8"])]) == {} and strongest_ratios({}) == {}
