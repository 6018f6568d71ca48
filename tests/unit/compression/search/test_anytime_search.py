"""The search's order and time budget on the tiny CNN of test_runner: cheap candidates first, a candidate that
would not finish within ``search.max_minutes`` is not started (the best so far is served and the report lists
what was not tried), a from-scratch student is skipped on a small calibration set, and every measured variant
carries its selection and confirmation figures. The clock is synthetic: each built candidate "takes" 40 s."""

from __future__ import annotations

from pathlib import Path

import pytest

from compression.models.names import ORIGINAL
from compression.search.candidates import Candidate
from compression.search.data import EvalData
from compression.search.report import markdown
from compression.search.runner import CANDIDATES_DIR, SearchReport, run_search
from compression.search.schedule import Deadline, plan, skip_reason
from compression.search.settings import CandidateSettings, CompressionSettings, SearchSettings
from tests.unit.compression.search.test_runner import BROKEN, CALIBRATION, CLIP, NET, VALIDATION, candidate, top1

STUDENT = {"technique": "student", "architecture": "depthwise_separable"}


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def search(out_dir: Path, candidates: list[dict], clock: Clock, lines: list[str], **search: object) -> SearchReport:
    settings = CompressionSettings.model_validate(
        {
            "budget": {"max_accuracy_drop": 1.0},
            "measurement": {"warmup": 1, "iterations": 10},
            "candidates": candidates,
            "search": search,
        }
    )

    def built(name: str, predictor: object) -> None:
        clock.now += 40.0

    return run_search(
        NET,
        settings,
        EvalData(CALIBRATION, VALIDATION, top1(NET)),
        out_dir,
        model_name="tiny",
        max_batch_size=8,
        progress=lines.append,
        on_candidate_built=built,
        clock=clock,
    )


def as_candidates(*settings: dict) -> list[Candidate]:
    return [Candidate.from_settings(CandidateSettings.model_validate(s)) for s in settings]


def test_cheap_candidates_come_first_in_the_configured_order_within_a_class() -> None:
    ordered = plan(
        as_candidates(
            candidate("pruned", [BROKEN]),
            candidate("clipped", [CLIP]),
            candidate("fp32"),
            {"name": "int8", "realization": {"runtime": "onnxruntime", "precision": "int8"}},
            candidate("bn-fp32", [{"technique": "bn_fold"}], "onnxruntime"),
        )
    )
    assert [c.name for c in ordered] == ["fp32", "bn-fp32", "clipped", "int8", "pruned"]


def test_the_time_budget_stops_the_search_and_serves_the_best_so_far(tmp_path: Path) -> None:
    clock, lines = Clock(), []
    candidates = [candidate("broken", [BROKEN]), candidate("clipped", [CLIP]), candidate("fp32")]
    report = search(tmp_path, candidates, clock, lines, max_minutes=1)
    # fp32 (lossless, first) is built in 40 s; clipped is expected to take 40 s more and broken its 120 s of
    # distillation, both past the 60 s budget
    assert report.not_tried == ["clipped", "broken"] and report.max_minutes == 1
    assert [c.name for c in report.candidates] == ["broken", "clipped", "fp32"]  # the configured order
    for name in report.not_tried:
        variant = report.variant(name)
        assert variant.skipped is not None and variant.skipped.startswith("not tried: the search's time budget")
        assert variant.latency_p95_ms is None and variant.build_seconds is None and not variant.meets_budget
    fp32 = report.variant("fp32")
    assert fp32.lossless and fp32.meets_budget and report.chosen in (ORIGINAL, "fp32")
    assert any("ETA" in line and "of 60 s" in line for line in lines)
    assert "## Not built" in markdown(report) and "- clipped: not tried" in markdown(report)


def test_without_a_time_budget_everything_is_tried(tmp_path: Path) -> None:
    clock, lines = Clock(), []
    report = search(tmp_path, [candidate("clipped", [CLIP]), candidate("fp32")], clock, lines)
    assert report.not_tried == [] and report.max_minutes is None
    assert all(c.skipped is None and c.latency_p95_ms is not None for c in report.candidates)
    built = [line.split(" candidate ")[1].split(":")[0] for line in lines if " candidate " in line]
    assert built == ["fp32", "clipped"]  # cheap first


def test_every_measured_variant_carries_selection_and_confirmation_figures(tmp_path: Path) -> None:
    report = search(tmp_path, [candidate("clipped", [CLIP]), candidate("fp32")], Clock(), [])
    assert report.selection["selection_images"] == 50 and report.selection["confirmation_images"] == 50
    assert report.selection["confidence"] == 0.95 and sum(report.selection["class_images"].values()) == 100
    clipped = report.variant("clipped")
    assert clipped.selection is not None and clipped.confirmation is not None and not clipped.lossless
    assert clipped.selection["images"] == 50 and clipped.selection["top1_drop_upper"] > clipped.selection["top1_drop"]
    assert clipped.accuracy_verdict is not None and not clipped.meets_accuracy  # 23 points lost
    assert clipped.class_top1_drop is not None and set(clipped.class_top1_drop) <= set(report.selection["class_images"])
    assert SearchReport.from_json(report.to_json()) == report
    assert "## Accuracy evidence" in markdown(report)


def test_a_student_is_skipped_on_a_small_calibration_set_with_the_reason(tmp_path: Path) -> None:
    report = search(tmp_path, [candidate("student", [STUDENT]), candidate("fp32")], Clock(), [])
    student = report.variant("student")
    assert student.skipped is not None and "at least 10000 calibration images" in student.skipped
    assert "there are 64" in student.skipped and student.build_seconds is None and student.error is None
    assert report.not_tried == [] and not (tmp_path / CANDIDATES_DIR / "student").exists()
    assert "skipped" in markdown(report)


def test_a_pre_distilled_student_or_a_lower_threshold_is_not_skipped() -> None:
    (scratch,) = as_candidates(candidate("student", [STUDENT]))
    (given,) = as_candidates(candidate("student", [{**STUDENT, "weights_path": "/models/student.pt"}]))
    assert skip_reason(scratch, 64, SearchSettings()) is not None
    assert skip_reason(given, 64, SearchSettings()) is None
    assert skip_reason(scratch, 64, SearchSettings(student_min_images=64)) is None


def test_the_deadline_expects_a_class_it_has_not_seen_from_its_distillation_budget() -> None:
    clock = Clock()
    deadline = Deadline(3, clock)
    fp32, clipped, pruned = as_candidates(candidate("fp32"), candidate("clipped", [CLIP]), candidate("p", [BROKEN]))
    assert deadline.admits(fp32) and deadline.expected(pruned) == 120.0
    clock.now = 30.0
    deadline.record(fp32, 30.0)
    assert deadline.expected(clipped) == 30.0 and deadline.expected(fp32) == 30.0
    assert deadline.admits(pruned)  # 30 + 120 <= 180
    clock.now = 100.0
    assert not deadline.admits(pruned) and deadline.admits(clipped)
    assert deadline.eta([clipped, pruned]) == 80.0  # 150 expected, capped by the 80 s left
