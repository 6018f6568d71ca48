"""The pruning-ratio search: bisection on synthetic monotone accuracy curves (no models), the settings it is
configured by, and the search on the tiny CNN of test_runner (each ratio tried is a variant of its own, the
ratios follow the verdicts, the time budget stops it)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from compression.search.candidates import Candidate
from compression.search.ratio_search import RatioBisection
from compression.search.settings import CandidateSettings, RatioSearchSettings
from tests.unit.compression.search.test_anytime_search import Clock, search
from tests.unit.compression.search.test_runner import candidate

PRUNE = {"technique": "channel_prune", "distillation": {"epochs": 0}}
GRID = [round(0.1 + 0.05 * i, 4) for i in range(15)]


def bisect(boundary: float, settings: RatioSearchSettings = RatioSearchSettings()) -> RatioBisection:
    """Run the bisection against an accuracy curve that is within the budget exactly up to ``boundary``."""
    search = RatioBisection(settings)
    while (ratio := search.next_ratio()) is not None:
        search.record(ratio, within_budget=ratio <= boundary + 1e-9)
    return search


def test_the_grid_spans_low_to_high_at_the_resolution() -> None:
    assert RatioBisection(RatioSearchSettings()).grid == GRID


@pytest.mark.parametrize("boundary", [0.05, *GRID, 0.37, 0.9])
def test_bisection_finds_the_boundary_of_a_monotone_curve_in_few_steps(boundary: float) -> None:
    found = bisect(boundary, RatioSearchSettings(max_steps=10))
    expected = max((r for r in GRID if r <= boundary + 1e-9), default=None)
    assert found.best == expected
    # 4 builds for 15 ratios; one more when the first (middle) ratio fails: the weakest is tried next
    assert found.steps <= math.ceil(math.log2(len(GRID) + 1)) + (boundary < 0.45)


def test_each_verdict_bounds_the_next_ratio() -> None:
    search = RatioBisection(RatioSearchSettings())
    assert search.next_ratio() == 0.45  # the middle of the grid first
    search.record(0.45, within_budget=False)
    assert search.next_ratio() == 0.1  # a failure rules out every stronger ratio; with no pass, the weakest next
    search.record(0.1, within_budget=True)
    assert search.next_ratio() == 0.25  # a pass clears every weaker one: the middle of what is left
    assert search.unknown() == [0.15, 0.2, 0.25, 0.3, 0.35, 0.4]


def test_the_step_limit_keeps_the_best_so_far() -> None:
    found = bisect(0.62, RatioSearchSettings(max_steps=2))
    assert (found.passed, found.failed) == ([0.45], [0.65])
    assert found.best == 0.45
    assert found.next_ratio() is None


def test_a_curve_failing_everywhere_has_no_answer() -> None:
    found = bisect(0.0)
    assert found.best is None
    assert found.failed == [0.45, 0.1]  # two builds


def test_ratio_search_settings_are_validated() -> None:
    with pytest.raises(ValidationError, match="must not exceed high"):
        RatioSearchSettings(low=0.6, high=0.3)
    with pytest.raises(ValidationError, match="exactly one channel_prune step"):
        CandidateSettings.model_validate({"name": "p", "steps": [], "ratio_search": {}})
    with pytest.raises(ValidationError, match="exactly one channel_prune step"):
        CandidateSettings.model_validate({"name": "p", "steps": [PRUNE, PRUNE], "ratio_search": {}})


def test_a_ratio_variant_is_realized_like_the_best_unpruned_candidate() -> None:
    searched = Candidate.from_settings(
        CandidateSettings.model_validate({"name": "pruned", "steps": [PRUNE], "ratio_search": {}})
    )
    like = Candidate.from_settings(
        CandidateSettings.model_validate(
            {
                "name": "onnxruntime-fp32",
                "steps": [{"technique": "bn_fold"}],
                "realization": {"runtime": "onnxruntime", "precision": "fp32"},
            }
        )
    )
    variant = searched.at_ratio(0.35, like)
    assert variant.name == "pruned-r35-onnxruntime-fp32"
    assert [step.name for step in variant.steps] == ["channel_prune", "bn_fold"]
    assert variant.steps[0].ratio == 0.35
    assert variant.realization == like.realization
    assert variant.ratio_search is None
    assert searched.at_ratio(0.1, None).name == "pruned-r10"


def test_the_search_builds_one_variant_per_ratio_in_bisection_order(tmp_path: Path) -> None:
    lines: list[str] = []
    searched = {**candidate("pruned", [PRUNE]), "ratio_search": {"max_steps": 3}}
    report = search(tmp_path, [candidate("fp32"), searched], Clock(), lines)
    steps = [v for v in report.candidates if v.ratio_search == "pruned"]
    assert [v.search_step for v in steps] == list(range(1, len(steps) + 1)) and len(steps) >= 2
    replay = RatioBisection(RatioSearchSettings(max_steps=3))
    for variant in steps:
        assert variant.prune_ratio == replay.next_ratio()
        assert variant.name == f"pruned-r{round(variant.prune_ratio * 100):02d}-fp32"
        assert variant.latency_p50_ms is not None and variant.selection is not None
        # NOTE: the search acts on the selection images alone; the final verdict adds the confirmation images.
        within_on_selection = variant.accuracy_verdict is None or variant.accuracy_verdict.startswith(
            "failed confirmation"
        )
        replay.record(variant.prune_ratio, within_on_selection)
    assert replay.next_ratio() is None  # the search stopped where the bisection does
    assert [point["ratio"] for point in report.frontier["pruned"]] == sorted(v.prune_ratio for v in steps)
    assert any("ratio search realizes each pruned model like fp32" in line for line in lines)
    assert any(f"{len(steps)} ratios tried" in line for line in lines)


def test_the_time_budget_stops_the_ratio_search_and_reports_it(tmp_path: Path) -> None:
    clock, lines = Clock(), []
    searched = {**candidate("pruned", [PRUNE]), "ratio_search": {"max_steps": 4}}
    # NOTE: each build "takes" 40 s: fp32, then one ratio fits in 90 s, a second would not.
    report = search(tmp_path, [candidate("fp32"), searched], clock, lines, max_minutes=1.5)
    steps = [v for v in report.candidates if v.ratio_search == "pruned"]
    assert len(steps) == 1
    assert report.not_tried == ["pruned (ratios after the 1 tried)"]
    assert any("the time budget stops the ratio search" in line for line in lines)


def test_the_time_budget_cuts_a_started_candidates_distillation_to_the_time_left(tmp_path: Path) -> None:
    clock, lines = Clock(), []
    recovering = {"technique": "channel_prune", "distillation": {"epochs": 1, "time_budget_s": 120}}
    searched = {**candidate("pruned", [recovering]), "ratio_search": {"max_steps": 1}}
    # NOTE: fp32 "takes" 40 s of the 3 minutes; 75% of the 140 s left is 105 s, less than the step's 120 s.
    report = search(tmp_path, [candidate("fp32"), searched], clock, lines, max_minutes=3)
    (step,) = [v for v in report.candidates if v.ratio_search == "pruned"]
    assert step.steps[0]["distillation"]["time_budget_s"] == 105.0
    assert any("distillation cut to 105 s" in line for line in lines)
