"""The budgeted search on the real digits model: measured figures, budgets, reports and the cache."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from compression.models.loading import LoadedModel, load_model
from compression.models.names import ORIGINAL
from compression.search.pipeline import CompressedEntry, cached_entry, compress, compression_key
from compression.search.selection import choose
from compression.search.settings import BudgetSettings, CompressionSettings
from server.config.settings import ModelSettings, default_config

pytestmark = pytest.mark.slow

CANDIDATES = [
    {
        "name": "onnxruntime-fp32",
        "steps": [{"technique": "bn_fold"}],
        "realization": {"runtime": "onnxruntime", "precision": "fp32"},
    },
    {"name": "int8-onnxruntime", "realization": {"runtime": "onnxruntime", "precision": "int8"}},
    {
        "name": "sparse80",
        "steps": [{"technique": "magnitude_prune", "sparsity": 0.8}],
        "realization": {"runtime": "eager", "precision": "fp32"},
    },
]


def digits_settings(**budget: object) -> ModelSettings:
    compression = CompressionSettings.model_validate(
        {
            "budget": {"max_accuracy_drop": 1.0, **budget},
            "data": {"calibration_size": 512, "validation_size": 500},
            "measurement": {"warmup": 5, "iterations": 30},
            "candidates": CANDIDATES,
        }
    )
    return default_config().models[0].model_copy(update={"compression": compression})


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def loaded(cache_root: Path) -> LoadedModel:
    return load_model(digits_settings(), default_config().resolved_cache_dir())


@pytest.fixture(scope="module")
def searched(cache_root: Path, loaded: LoadedModel) -> CompressedEntry:
    return compress(digits_settings(), loaded, cache_root)


def test_every_candidate_is_measured(searched: CompressedEntry) -> None:
    report = searched.report
    assert report.original.top1 is not None and report.original.top1 >= 0.97
    assert {c.name for c in report.candidates} == {c["name"] for c in CANDIDATES}
    for variant in [report.original, *report.candidates]:
        assert variant.error is None, variant.error
        assert 0 < variant.latency_p50_ms <= variant.latency_p95_ms
        assert variant.top1 is not None and variant.top1_drop is not None and variant.top1_drop_ci95 is not None
        low, high = variant.top1_drop_ci95
        assert low <= variant.top1_drop <= high
        assert variant.size_bytes and variant.params and variant.macs and variant.compressed_bytes
    data = json.loads((searched.folder / "report.json").read_text())
    assert data["chosen"] == report.chosen and data["cache_key"]
    assert (searched.folder / "report.md").read_text().count("|") > 20
    assert (searched.folder / "pareto.png").stat().st_size > 10_000


def test_int8_is_within_one_point_and_chosen_variant_is_served_from_its_artifact(searched: CompressedEntry) -> None:
    report = searched.report
    int8 = report.variant("int8-onnxruntime")
    assert int8.top1_drop is not None and int8.top1_drop <= 1.0
    assert int8.size_bytes < report.original.size_bytes / 2  # int8 weights
    chosen = report.variant(report.chosen)
    assert chosen.meets_budget and chosen.top1_drop is not None and chosen.top1_drop <= 1.0
    if report.chosen != ORIGINAL:
        assert searched.chosen_artifact is not None and (searched.chosen_artifact / "manifest.json").is_file()
    # only the chosen artifact is kept
    kept = {p.name for p in (searched.folder / "candidates").iterdir()}
    assert kept == ({report.chosen} - {ORIGINAL})


def test_unstructured_sparsity_reports_storage_cut_and_no_speed_claim(searched: CompressedEntry) -> None:
    sparse = searched.report.variant("sparse80")
    assert sparse.sparsity is not None and sparse.sparsity >= 0.75
    assert sparse.compressed_bytes < 0.5 * searched.report.original.compressed_bytes
    assert sparse.note is not None and "does not speed up" in sparse.note


def test_a_variant_outside_the_accuracy_budget_is_never_chosen(searched: CompressedEntry) -> None:
    report = searched.report
    for variant in report.candidates:
        if variant.top1_drop is not None and variant.top1_drop > 1.0:
            assert not variant.meets_budget and report.chosen != variant.name


def test_latency_budget_only_some_meet_picks_the_fastest_within_accuracy(searched: CompressedEntry) -> None:
    """Re-selects on the figures measured above, with a latency budget between the variants."""
    from compression.search.runner import _measured

    variants = [searched.report.original, *searched.report.candidates]
    measured = [_measured(v) for v in variants]
    accurate = [m for m, v in zip(measured, variants, strict=True) if v.meets_accuracy]  # bounds, not points
    fastest = min(accurate, key=lambda m: m.latency_p95_ms)
    budget = BudgetSettings(max_latency_ms=fastest.latency_p95_ms * 1.001, max_accuracy_drop=1.0)
    choice = choose(measured, budget)
    assert choice.name == fastest.name and choice.budget_met


def test_second_start_uses_the_cache_and_a_changed_budget_does_not(
    searched: CompressedEntry, cache_root: Path, loaded: LoadedModel
) -> None:
    messages: list[str] = []
    again = compress(digits_settings(), loaded, cache_root, progress=messages.append)
    assert again.folder == searched.folder and again.report.chosen == searched.report.chosen
    assert any("no search needed" in m for m in messages) and not any("searching" in m for m in messages)
    changed = digits_settings(max_accuracy_drop=0.5)
    assert compression_key(changed, loaded)[0] != compression_key(digits_settings(), loaded)[0]
    assert cached_entry(changed, loaded, cache_root) is None


def test_report_round_trips(searched: CompressedEntry) -> None:
    entry = cached_entry(
        digits_settings(),
        load_model(digits_settings(), default_config().resolved_cache_dir()),
        searched.folder.parent.parent.parent,
    )
    assert entry is not None
    assert dataclasses.asdict(entry.report) == dataclasses.asdict(searched.report)
