"""The budgeted search: candidates -> build -> measure (latency, fidelity, size) -> choose.

Every figure is measured: latency with the exact predictor that would be served, interleaved across
candidates; fidelity on the validation split, which no technique has seen. A technique that fails on
a model is recorded with its reason and the search goes on.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compression.context import CompressionContext
from compression.errors import TechniqueError, first_line
from compression.models.names import ORIGINAL
from compression.runtimes.cuda_support import module_device, require_cuda
from compression.runtimes.eager import reference_predictor
from compression.runtimes.predictor import Predictor
from compression.runtimes.realization import build_predictor
from compression.search.accuracy import Fidelity, fidelity, predict_top1
from compression.search.candidates import Candidate, default_candidates
from compression.search.data import EvalData
from compression.search.latency import measure_latency
from compression.search.selection import Measured, choose, meets_accuracy, meets_latency
from compression.search.settings import CompressionSettings
from compression.techniques import analysis
from compression.techniques.registry import apply, config_to_dict

log = logging.getLogger("slimserve.compression")

CANDIDATES_DIR = "candidates"
SCORE_SAMPLES = 512
STORAGE_ONLY = {"magnitude_prune", "weight_cluster", "weight_clip"}
TEACHER_ONLY = {"student"}
"""Techniques that only run the model they start from (as the teacher), so any model will do."""
OPAQUE_TORCHSCRIPT = (
    "the model is TorchScript that could not be converted to a graph at load (the server log says why), so it "
    "cannot be traced or exported; compress it from a torch.export or python source, or with a 'student' step first"
)


@dataclass
class VariantReport:
    name: str
    techniques: list[str]
    steps: list[dict[str, Any]] = field(default_factory=list)
    realization: dict[str, Any] = field(default_factory=dict)
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    top1: float | None = None
    top1_drop: float | None = None
    top1_drop_ci95: tuple[float, float] | None = None
    agreement: float | None = None
    agreement_ci95: tuple[float, float] | None = None
    size_bytes: int | None = None
    """Bytes of the artifact files that would be served (the original: its serialized state_dict)."""
    compressed_bytes: int | None = None
    """The weights' serialized size after zlib: where sparsity and clustering show."""
    params: int | None = None
    macs: int | None = None
    sparsity: float | None = None
    meets_accuracy: bool = False
    meets_latency: bool = False
    meets_budget: bool = False
    build_seconds: float | None = None
    artifact: str | None = None
    """Artifact folder relative to the report (kept for the chosen variant only)."""
    error: str | None = None
    note: str | None = None

    def apply_fidelity(self, measured: Fidelity) -> None:
        self.top1, self.top1_drop, self.top1_drop_ci95 = measured.top1, measured.top1_drop, measured.top1_drop_ci95
        self.agreement, self.agreement_ci95 = measured.agreement, measured.agreement_ci95


@dataclass
class SearchReport:
    model: str
    device: str
    batch_size: int
    budget: dict[str, Any]
    data: dict[str, Any]
    original: VariantReport
    candidates: list[VariantReport]
    chosen: str
    reason: str
    budget_met: bool
    search_seconds: float
    cache_key: str = ""
    key_inputs: dict[str, Any] = field(default_factory=dict)

    def variant(self, name: str) -> VariantReport:
        return next(v for v in [self.original, *self.candidates] if v.name == name)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    @classmethod
    def from_json(cls, text: str) -> SearchReport:
        data = json.loads(text)
        data["original"] = _variant_from_json(data["original"])
        data["candidates"] = [_variant_from_json(c) for c in data["candidates"]]
        return cls(**data)


def _variant_from_json(data: dict[str, Any]) -> VariantReport:
    for key in ("top1_drop_ci95", "agreement_ci95"):
        if data.get(key) is not None:
            data[key] = tuple(data[key])
    return VariantReport(**data)


@dataclass
class _Built:
    report: VariantReport
    predictor: Predictor


def run_search(
    model: nn.Module,
    settings: CompressionSettings,
    data: EvalData,
    out_dir: Path,
    *,
    model_name: str,
    max_batch_size: int,
    progress: Callable[[str], None] = log.info,
    on_candidate_built: Callable[[str, Predictor], None] | None = None,
) -> SearchReport:
    """Build and measure every candidate into ``out_dir``; keep only the chosen artifact.

    On a GPU target the search works on a copy of ``model`` moved there (the teacher of distillation
    runs there too); the caller's model stays where it was.

    ``on_candidate_built(name, predictor)``, if given, is called once per candidate that built, with the
    candidate's name and its predictor loaded from the artifact, right after it is built and before any
    candidate is measured; the predictor is the very object the search then measures (it stays usable
    after the search even though unchosen artifacts are deleted from disk, since it is already loaded).
    It is not called for the original (the caller's own model) nor for a candidate that failed to build.
    An exception it raises ends the search.
    """
    started = time.perf_counter()
    device = require_cuda(settings.target.device)
    batch = settings.target.batch_size
    model = model.eval() if device.type == "cpu" else copy.deepcopy(model).eval().to(device)
    example = _example(data.calibration, batch)
    input_shape = tuple(example.shape[1:])
    serve_batch = max(max_batch_size, batch)
    ctx = CompressionContext(
        calibration_inputs=data.calibration, example_inputs=example, teacher=model, device=device, progress=progress
    )
    candidates = [Candidate.from_settings(c) for c in settings.candidates or default_candidates(str(device))]

    original = VariantReport(
        ORIGINAL,
        ["original"],
        params=analysis.count_params(model),
        macs=analysis.count_macs(model, example[:1]),
        size_bytes=analysis.state_dict_bytes(model),
        compressed_bytes=analysis.compressed_bytes(model),
    )
    built = {ORIGINAL: _Built(original, reference_predictor(model, device, input_shape, serve_batch))}
    score_fn, max_drop = _int8_scorer(model, data.calibration, settings, serve_batch)
    transformed: dict[str, nn.Module] = {}
    for index, candidate in enumerate(candidates, 1):
        progress(f"[{index}/{len(candidates)}] candidate {candidate.name}: {' -> '.join(candidate.techniques)}")
        result = _build(
            candidate,
            model,
            ctx,
            out_dir / CANDIDATES_DIR / candidate.name,
            transformed,
            serve_batch,
            score_fn,
            max_drop,
        )
        if isinstance(result, VariantReport):
            progress(f"[{index}/{len(candidates)}] {candidate.name} FAILED: {result.error}")
            built[candidate.name] = _Built(result, None)  # type: ignore[arg-type]
        else:
            built[candidate.name] = result
            if on_candidate_built is not None:
                on_candidate_built(candidate.name, result.predictor)

    working = {name: b for name, b in built.items() if b.report.error is None}
    progress(
        f"measuring latency of {len(working)} variants at batch {batch} on {device} "
        f"({settings.measurement.iterations} interleaved rounds)"
    )
    latencies = measure_latency(
        {n: b.predictor for n, b in working.items()},
        example,
        warmup=settings.measurement.warmup,
        iterations=settings.measurement.iterations,
    )
    progress(f"measuring fidelity on {len(data.validation)} held-out images")
    reference = predict_top1(working[ORIGINAL].predictor, data.validation, serve_batch)
    for name, b in working.items():
        b.report.latency_p50_ms = latencies[name].p50_ms
        b.report.latency_p95_ms = latencies[name].p95_ms
        predictions = reference if name == ORIGINAL else predict_top1(b.predictor, data.validation, serve_batch)
        b.report.apply_fidelity(fidelity(predictions, reference, data.validation_labels))

    measured = [_measured(b.report) for b in working.values()]
    budget = settings.budget
    for b in working.values():
        m = _measured(b.report)
        b.report.meets_accuracy = meets_accuracy(m, budget)
        b.report.meets_latency = meets_latency(m, budget)
        b.report.meets_budget = b.report.meets_accuracy and b.report.meets_latency
    choice = choose(measured, budget)
    for name, b in built.items():
        if name != choice.name and name != ORIGINAL:
            shutil.rmtree(out_dir / CANDIDATES_DIR / name, ignore_errors=True)
    if choice.name != ORIGINAL:
        built[choice.name].report.artifact = f"{CANDIDATES_DIR}/{choice.name}"
    (log.warning if not choice.budget_met else progress)(f"chosen: {choice.name} ({choice.reason})")
    return SearchReport(
        model=model_name,
        device=str(device),
        batch_size=batch,
        budget=budget.model_dump(),
        data={
            "calibration_images": len(data.calibration),
            "validation_images": len(data.validation),
            "labelled": data.validation_labels is not None,
        },
        original=original,
        candidates=[b.report for n, b in built.items() if n != ORIGINAL],
        chosen=choice.name,
        reason=choice.reason,
        budget_met=choice.budget_met,
        search_seconds=round(time.perf_counter() - started, 1),
    )


def _build(
    candidate: Candidate,
    model: nn.Module,
    ctx: CompressionContext,
    artifact_dir: Path,
    transformed: dict[str, nn.Module],
    serve_batch: int,
    score_fn: Callable[[Predictor], float],
    max_drop: float,
) -> _Built | VariantReport:
    report = VariantReport(
        candidate.name,
        candidate.techniques,
        [config_to_dict(s) for s in candidate.steps],
        candidate.realization.to_dict(),
    )
    if any(step.name in STORAGE_ONLY for step in candidate.steps):
        report.note = "storage technique: shrinks the compressed weights, does not speed up dense kernels"
    started = time.perf_counter()
    try:
        current = _apply_chain(candidate, model, ctx, transformed)
        int8 = candidate.realization.precision == "int8"
        predictor = build_predictor(
            current,
            candidate.realization,
            ctx,
            artifact_dir,
            max_batch_size=serve_batch,
            score_fn=score_fn if int8 else None,
            max_score_drop=max_drop if int8 else None,
        )
    except Exception as exc:  # noqa: BLE001 - a failing technique is a result, not a crash
        log.debug("candidate %s failed", candidate.name, exc_info=True)
        report.error = f"{type(exc).__name__}: {exc}"
        log.warning("candidate %s failed: %s", candidate.name, first_line(report.error)[:300])
        report.build_seconds = round(time.perf_counter() - started, 1)
        return report
    report.build_seconds = round(time.perf_counter() - started, 1)
    report.params = analysis.count_params(current)
    report.macs = analysis.count_macs(current, ctx.example_inputs[:1])
    report.sparsity = round(analysis.sparsity(current), 4)
    report.compressed_bytes = analysis.compressed_bytes(current)
    report.size_bytes = sum(
        p.stat().st_size for p in artifact_dir.rglob("*") if p.is_file() and p.name != "manifest.json"
    )
    return _Built(report, predictor)


def _apply_chain(
    candidate: Candidate, model: nn.Module, ctx: CompressionContext, transformed: dict[str, nn.Module]
) -> nn.Module:
    """Apply the candidate's techniques; chains share prefixes (prune -> fp32, prune -> int8), built once."""
    current = model
    with training_threads():
        for depth in range(1, len(candidate.steps) + 1):
            step = candidate.steps[depth - 1]
            if isinstance(current, torch.jit.ScriptModule) and step.name not in TEACHER_ONLY:
                raise TechniqueError(f"{step.name}: {OPAQUE_TORCHSCRIPT}")
            key = json.dumps([config_to_dict(s) for s in candidate.steps[:depth]], sort_keys=True)
            if key not in transformed:
                transformed[key] = apply(current, step, ctx).eval()
            current = transformed[key]
    if isinstance(current, torch.jit.ScriptModule):
        raise TechniqueError(f"{candidate.realization.runtime} {candidate.realization.precision}: {OPAQUE_TORCHSCRIPT}")
    return current


@contextmanager
def training_threads(threads: int = 1) -> Iterator[None]:
    """Fine-tuning and distillation run on one intra-op thread.

    NOTE: measured on this 2-core machine with other work running (e.g. the server, while it
    compresses at start-up): 2 KD epochs on digits took 75 s with 2 threads and 10 s with 1.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _int8_scorer(
    model: nn.Module, calibration: torch.Tensor, settings: CompressionSettings, batch: int
) -> tuple[Callable[[Predictor], float], float]:
    """Agreement (%) with the original on calibration images, for int8's per-layer float fallback.

    NOTE: calibration images, not validation ones: choosing fallback layers on the validation split
    would tune to the very images the final accuracy is reported on.
    """
    images = calibration[:SCORE_SAMPLES]
    device = module_device(model)
    with torch.inference_mode():
        expected = np.concatenate(
            [model(images[i : i + batch].to(device)).argmax(1).cpu().numpy() for i in range(0, len(images), batch)]
        )

    def score(predictor: Predictor) -> float:
        return float((predict_top1(predictor, images, batch) == expected).mean() * 100)

    budget = settings.budget
    max_drop = budget.max_accuracy_drop if budget.max_accuracy_drop is not None else (1 - budget.min_agreement) * 100  # type: ignore[operator]
    return score, max_drop


def _measured(report: VariantReport) -> Measured:
    assert report.latency_p95_ms is not None and report.agreement is not None
    return Measured(report.name, report.latency_p95_ms, report.top1, report.top1_drop, report.agreement)


def _example(calibration: torch.Tensor, batch: int) -> torch.Tensor:
    repeats = -(-batch // len(calibration))
    return calibration.repeat(repeats, 1, 1, 1)[:batch].contiguous()
