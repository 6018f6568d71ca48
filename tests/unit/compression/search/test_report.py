"""report.md and pareto.png with and without a pruning-ratio search, and for a report written before one.

Reports are built from ``VariantReport``/``SearchReport`` objects directly (no models); the plot is checked to be
written, and its error bars' direction (top-1 is the original's minus the drop) on the figures themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compression.search.frontier import frontier
from compression.search.report import fidelity_error, markdown, pareto_plot, report_frontier, write_reports
from compression.search.runner import SearchReport, VariantReport
from tests import REPO_ROOT
from tests.unit.compression.search.test_frontier import OUTSIDE, searched, step

OLD_REPORT = REPO_ROOT / "docs" / "gpu" / "fidelity-search-h100.json"
"""A real report from before the ratio search (no ``frontier``, ``ratio_search``, ``selection``...)."""

BUDGET = {
    "max_latency_ms": 9.0,
    "max_accuracy_drop": 1.5,
    "min_agreement": None,
    "objective": "fastest",
    "on_unmet": "best_accuracy",
}


def report(candidates: list[VariantReport], *, labelled: bool = True, stored: bool = True) -> SearchReport:
    original = VariantReport("original", [], latency_p50_ms=10.0, latency_p95_ms=11.0, agreement=1.0, macs=50_000_000)
    original.agreement_ci95 = (0.99, 1.0)
    if labelled:
        original.top1, original.top1_drop, original.top1_drop_ci95 = 0.95, 0.0, (0.0, 0.0)
    chosen = "pruned-r35-int8-onnxruntime"
    return SearchReport(
        model="tiny",
        device="cpu",
        batch_size=8,
        budget=BUDGET,
        data={"calibration_images": 500, "validation_images": 500, "labelled": labelled},
        original=original,
        candidates=candidates,
        chosen=chosen,
        reason="fastest within the budget",
        budget_met=True,
        search_seconds=42.0,
        frontier=frontier(candidates) if stored else {},
    )


def section(text: str) -> str:
    assert "## Pruning-ratio search" in text
    return text.split("## Pruning-ratio search")[1]


def test_the_markdown_has_a_table_per_searched_chain_and_the_strongest_ratio() -> None:
    text = section(markdown(report(searched())))
    assert "### pruned" in text
    assert "| ratio | step | MMACs | p50 ms | speed-up vs original p50 | top-1 (drop) | drop upper bound, pt |" in text
    rows = [line for line in text.splitlines() if line.startswith("| 0.")]
    assert [row.split(" | ")[0] for row in rows] == ["| 0.25", "| 0.35", "| 0.45"]  # ratio order, not step order
    assert rows[0] == "| 0.25 | 2 | 28.1 | 7.50 | 1.33x | 94.00% (+1.00 pt) | +2.20 | within the accuracy budget |"
    assert rows[1].endswith("| within the accuracy budget (chosen) |")
    assert OUTSIDE in rows[2]
    assert "Strongest ratio within the accuracy budget: 0.35 (pruned-r35-int8-onnxruntime)." in text


def test_a_chain_with_no_ratio_within_the_budget_says_so() -> None:
    candidates = [step(0.45, 1, verdict=OUTSIDE), step(0.25, 2, verdict=OUTSIDE), step(0.8, 3, error="boom")]
    text = section(markdown(report(candidates)))
    assert "None of the 3 ratios tried is within the accuracy budget." in text and "Strongest" not in text
    assert "| 0.8 | 3 | - | - | - | - | - | FAILED: boom |" in text


def test_without_labels_the_table_shows_agreement_and_its_lower_bound() -> None:
    text = section(markdown(report([step(0.3, 1, labelled=False)], labelled=False)))
    assert "| agreement % | agreement lower % |" in text and "| 97.00 | 95.00 |" in text


def test_the_frontier_is_computed_from_the_candidates_when_the_report_has_none_stored() -> None:
    computed = report(searched(), stored=False)
    assert computed.frontier == {} and report_frontier(computed) == report(searched()).frontier
    assert section(markdown(computed)) == section(markdown(report(searched())))


def test_no_section_without_a_ratio_search() -> None:
    plain = report([VariantReport("int8", ["onnxruntime:int8"], latency_p95_ms=3.0, top1=0.95, agreement=1.0)])
    assert plain.frontier == {} and "Pruning-ratio search" not in markdown(plain)


def test_error_bars_flip_the_drop_interval_onto_top1() -> None:
    v = VariantReport("int8", [], top1=0.94, top1_drop=1.0, top1_drop_ci95=(0.2, 2.6))
    # top-1 = original's - drop: the drop's upper end (+2.6) is the top-1's lower end, 1.6 points below
    assert fidelity_error(v) == pytest.approx((1.6, 0.8))
    unlabelled = VariantReport("int8", [], agreement=0.97, agreement_ci95=(0.95, 0.98))
    assert fidelity_error(unlabelled) == pytest.approx((2.0, 1.0))
    assert fidelity_error(VariantReport("broken", [], error="boom")) is None


def _png(path: Path) -> None:
    assert path.exists() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("stored", [True, False])
def test_the_plot_is_written_with_a_frontier(tmp_path: Path, stored: bool) -> None:
    candidates = [*searched(), step(0.8, 4, error="boom"), step(0.3, 1, chain="pruned-fp16", verdict=OUTSIDE)]
    pareto_plot(report(candidates, stored=stored), tmp_path / "pareto.png")
    _png(tmp_path / "pareto.png")


def test_the_plot_is_written_without_labels_or_a_frontier(tmp_path: Path) -> None:
    plain = VariantReport("int8", ["onnxruntime:int8"], latency_p95_ms=3.0, agreement=0.99)
    plain.agreement_ci95 = (0.97, 1.0)
    pareto_plot(report([plain], labelled=False), tmp_path / "pareto.png")
    _png(tmp_path / "pareto.png")


def test_a_report_written_before_the_ratio_search_loads_and_renders(tmp_path: Path) -> None:
    data = json.loads(OLD_REPORT.read_text())
    assert "frontier" not in data and all("ratio_search" not in c for c in data["candidates"])
    old = SearchReport.from_json(OLD_REPORT.read_text())
    assert old.frontier == {} and all(c.ratio_search is None and c.prune_ratio is None for c in old.candidates)
    write_reports(old, tmp_path)
    assert "Pruning-ratio search" not in (tmp_path / "report.md").read_text()
    _png(tmp_path / "pareto.png")
    assert json.loads((tmp_path / "report.json").read_text())["frontier"] == {}


def test_a_report_with_a_frontier_round_trips_through_json() -> None:
    with_frontier = report(searched())
    loaded = SearchReport.from_json(with_frontier.to_json())
    assert loaded.frontier == with_frontier.frontier
    assert loaded.variant("pruned-r35-int8-onnxruntime").prune_ratio == 0.35
