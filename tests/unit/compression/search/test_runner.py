"""``run_search`` on a tiny CNN (1x8x8 inputs, 4 classes): every candidate is built, measured and reported, a
failing technique is recorded with its one-line reason while the search goes on, the choice follows the budget
(objective, on_unmet), and only the chosen artifact stays in ``out_dir``.

Choices that must not depend on timings use labels made by the clipped model: its candidate is then the most
accurate by construction (top-1 1.0 against the original's 0.77)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compression.context import CompressionContext
from compression.models.names import ORIGINAL
from compression.runtimes.realization import load_predictor
from compression.search.data import EvalData
from compression.search.runner import CANDIDATES_DIR, SearchReport, run_search
from compression.search.selection import BudgetUnmet
from compression.search.settings import CompressionSettings
from compression.techniques.registry import apply, config_from_dict

with torch.random.fork_rng(devices=[]):
    torch.manual_seed(0)
    NET = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4)
    )
    NET.eval()
_gen = torch.Generator().manual_seed(0)
CALIBRATION, VALIDATION = torch.randn(64, 1, 8, 8, generator=_gen), torch.randn(100, 1, 8, 8, generator=_gen)
CLIP = {"technique": "weight_clip", "percentile": None, "k_std": 1.0}
CLIPPED = apply(NET, config_from_dict(CLIP), CompressionContext(CALIBRATION, CALIBRATION[:1], NET))
BROKEN = {"technique": "channel_prune", "importance": "bn_scale"}  # needs BatchNorm; NET has none
BROKEN_REASON = "TechniqueError: importance 'bn_scale' needs BatchNorm layers; the model has none (folded?)"


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


class Sleepy(nn.Module):
    """``NET`` with a 20 ms pause in every eager forward pass. Export traces tensor ops, not the pause, so every
    exported candidate is faster than this original by construction."""

    def __init__(self) -> None:
        super().__init__()
        self.net = NET

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        return self.net(x)


def top1(net: nn.Module) -> np.ndarray:
    with torch.no_grad():
        return net(VALIDATION).argmax(1).numpy()


def candidate(name: str, steps: list | None = None, runtime: str = "eager") -> dict:
    return {"name": name, "steps": steps or [], "realization": {"runtime": runtime, "precision": "fp32"}}


def search(
    out_dir: Path, candidates: list[dict], labels: np.ndarray | None, model: nn.Module = NET, **budget: object
) -> SearchReport:
    settings = CompressionSettings.model_validate(
        {"budget": budget, "measurement": {"warmup": 1, "iterations": 10}, "candidates": candidates}
    )
    data = EvalData(CALIBRATION, VALIDATION, labels)
    return run_search(model, settings, data, out_dir, model_name="tiny", max_batch_size=8, progress=lambda line: None)


def kept(out_dir: Path) -> list[str]:
    folder = out_dir / CANDIDATES_DIR
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="module")
def most_accurate(tmp_path_factory: pytest.TempPathFactory) -> tuple[SearchReport, Path]:
    """eager fp32, clipped (eager fp32) and a failing chain; most_accurate within a 1-point top-1 drop."""
    out = tmp_path_factory.mktemp("search")
    candidates = [candidate("fp32"), candidate("clipped", [CLIP]), candidate("broken", [BROKEN])]
    return search(out, candidates, top1(CLIPPED), objective="most_accurate", max_accuracy_drop=1.0), out


def test_every_candidate_is_built_measured_and_reported_in_order(most_accurate) -> None:  # type: ignore[no-untyped-def]
    report, _ = most_accurate
    assert [c.name for c in report.candidates] == ["fp32", "clipped", "broken"]
    assert report.data == {"calibration_images": 64, "validation_images": 100, "labelled": True}
    for variant in (report.original, report.variant("fp32"), report.variant("clipped")):
        assert variant.error is None and 0 < variant.latency_p50_ms <= variant.latency_p95_ms
        assert variant.size_bytes and variant.params == sum(p.numel() for p in NET.parameters()) and variant.macs
    assert report.variant("clipped").techniques == ["weight_clip", "eager:fp32"]
    assert report.variant("fp32").agreement == 1.0 and report.variant("fp32").top1 == report.original.top1
    shared = float((top1(NET) == top1(CLIPPED)).mean())  # 0.77: the clipped model changes 23 answers
    assert report.variant("clipped").top1 == 1.0 and report.original.top1 == pytest.approx(shared)
    assert report.variant("clipped").top1_drop == pytest.approx((shared - 1) * 100)
    assert report.variant("clipped").agreement == pytest.approx(shared)


def test_a_failing_technique_is_recorded_with_its_one_line_reason(most_accurate) -> None:  # type: ignore[no-untyped-def]
    report, out = most_accurate
    broken = report.variant("broken")
    assert broken.error == BROKEN_REASON and broken.build_seconds is not None
    assert broken.latency_p95_ms is None and broken.top1 is None and not broken.meets_budget
    assert broken.artifact is None and not (out / CANDIDATES_DIR / "broken").exists()


def test_most_accurate_chooses_the_best_top1_within_budget_and_keeps_only_its_artifact(most_accurate) -> None:  # type: ignore[no-untyped-def]
    report, out = most_accurate
    assert report.chosen == "clipped" and report.budget_met
    assert report.reason == "most accurate of 3 variants within the budget"
    assert all(report.variant(n).meets_budget for n in (ORIGINAL, "fp32", "clipped"))
    assert report.variant("clipped").artifact == f"{CANDIDATES_DIR}/clipped" and kept(out) == ["clipped"]
    predictor = load_predictor(out / CANDIDATES_DIR / "clipped")
    with torch.no_grad():
        torch.testing.assert_close(predictor(VALIDATION[:8]), CLIPPED(VALIDATION[:8]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("objective", "chosen", "reason"),
    [("fastest", "clipped", "fastest of 2"), ("most_accurate", ORIGINAL, "most accurate of 2")],
)
def test_the_objective_picks_speed_or_accuracy_within_the_budget(
    tmp_path: Path, objective: str, chosen: str, reason: str
) -> None:
    """A slow exact original against a fast clipped candidate 23 points less accurate (upper bounds about 33
    points on each 50-image part), within a 50-point budget."""
    report = search(
        tmp_path, [candidate("clipped", [CLIP])], top1(NET), Sleepy(), objective=objective, max_accuracy_drop=50
    )
    clipped = report.variant("clipped")
    assert clipped.meets_budget and clipped.latency_p95_ms < 20 <= report.original.latency_p95_ms
    assert report.original.top1 == 1.0 and clipped.top1 == pytest.approx(float((top1(CLIPPED) == top1(NET)).mean()))
    assert report.chosen == chosen and report.reason == f"{reason} variants within the budget"
    assert kept(tmp_path) == ([] if chosen == ORIGINAL else [chosen])


def test_fastest_without_labels_chooses_the_lowest_p95_by_agreement(tmp_path: Path) -> None:
    report = search(tmp_path, [candidate("fp32")], None, max_accuracy_drop=None, min_agreement=0.99)
    fp32 = report.variant("fp32")
    assert fp32.top1 is None and fp32.top1_drop is None and fp32.agreement == 1.0 and fp32.meets_budget
    assert report.reason == "fastest of 2 variants within the budget" and report.budget_met
    fastest = min((report.original, fp32), key=lambda v: v.latency_p95_ms)  # type: ignore[arg-type, return-value]
    assert report.chosen == fastest.name
    assert kept(tmp_path) == ([] if report.chosen == ORIGINAL else ["fp32"])


def test_an_unmet_latency_budget_serves_the_fastest_within_the_accuracy_budget(tmp_path: Path) -> None:
    candidates = [candidate("fp32"), candidate("clipped", [CLIP])]
    report = search(tmp_path, candidates, top1(NET), max_latency_ms=1e-6, on_unmet="best_accuracy")
    assert not report.budget_met and report.reason.startswith("BUDGET UNMET")
    assert "on_unmet='best_accuracy' serves the fastest within the accuracy budget" in report.reason
    clipped = report.variant("clipped")
    assert clipped.top1_drop > 1.0 and not clipped.meets_accuracy  # outside the accuracy budget: never a fallback
    assert not any(v.meets_latency for v in (report.original, *report.candidates))
    pool = [v for v in (report.original, *report.candidates) if v.meets_accuracy]
    assert [v.name for v in pool] == [ORIGINAL, "fp32"]
    assert report.chosen == min(pool, key=lambda v: v.latency_p95_ms).name  # type: ignore[arg-type, return-value]
    assert kept(tmp_path) == ([] if report.chosen == ORIGINAL else ["fp32"])


def test_an_unmet_latency_budget_with_on_unmet_original_serves_the_original(tmp_path: Path) -> None:
    report = search(tmp_path, [candidate("fp32")], top1(NET), max_latency_ms=1e-6, on_unmet="original")
    assert report.chosen == ORIGINAL and not report.budget_met
    assert "on_unmet='original' serves the original" in report.reason
    assert report.variant("fp32").meets_accuracy and report.variant("fp32").artifact is None
    assert kept(tmp_path) == []  # the built candidate's artifact is removed


def test_on_unmet_fail_raises_budget_unmet(tmp_path: Path) -> None:
    with pytest.raises(BudgetUnmet, match="p95 <= 1e-06 ms; on_unmet is 'fail'"):
        search(tmp_path, [candidate("broken", [BROKEN])], top1(NET), max_latency_ms=1e-6, on_unmet="fail")


@pytest.mark.slow
def test_onnxruntime_candidate_is_measured_and_served_from_its_artifact(tmp_path: Path) -> None:
    candidates = [candidate("ort", [CLIP], "onnxruntime"), candidate("broken", [BROKEN]), candidate("fp32")]
    report = search(tmp_path, candidates, top1(CLIPPED), objective="most_accurate")
    assert [c.name for c in report.candidates] == ["ort", "broken", "fp32"]
    assert report.variant("broken").error == BROKEN_REASON
    assert report.variant("fp32").latency_p95_ms is not None  # measured after the failure: the search went on
    ort = report.variant("ort")
    assert ort.techniques == ["weight_clip", "onnxruntime:fp32"] and ort.top1 == 1.0
    assert report.chosen == "ort" and kept(tmp_path) == ["ort"]
    with torch.no_grad():
        expected = CLIPPED(VALIDATION[:8])
    torch.testing.assert_close(load_predictor(tmp_path / ort.artifact)(VALIDATION[:8]), expected, rtol=1e-4, atol=1e-5)
