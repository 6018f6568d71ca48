"""The budgeted search: candidates -> build -> measure (latency, fidelity, size) -> choose.

Every figure is measured: latency with the exact predictor that would be served, interleaved across
candidates; fidelity on the validation split, which no technique has seen. A technique that fails on
a model is recorded with its reason and the search goes on.

Traced with the OpenTelemetry API only (:class:`SearchSpans`): spans are recorded only if the process
configured a tracer provider (``slimserve compress`` does when ``server.tracing`` is on).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode, Tracer
from torch import nn

from compression.context import CompressionContext
from compression.errors import TechniqueError, first_line
from compression.models.names import ORIGINAL
from compression.runtimes.cuda_support import module_device, require_cuda
from compression.runtimes.eager import reference_predictor
from compression.runtimes.predictor import Predictor
from compression.runtimes.realization import build_predictor
from compression.search.accuracy import Fidelity, class_drops, evidence, fidelity, predict_top1
from compression.search.candidates import Candidate, default_candidates
from compression.search.data import EvalData
from compression.search.frontier import frontier
from compression.search.latency import measure_latency
from compression.search.ratio_search import RatioBisection
from compression.search.schedule import LOSSLESS, TRAINING, Deadline, cost_class, plan, skip_reason, training_seconds
from compression.search.selection import (
    MIN_CLASS_IMAGES,
    Evidence,
    Measured,
    accuracy_verdict,
    choose,
    meets_accuracy,
    meets_latency,
)
from compression.search.settings import CompressionSettings
from compression.techniques import analysis
from compression.techniques.registry import apply, config_to_dict

log = logging.getLogger("slimserve.compression")

CANDIDATES_DIR = "candidates"
PICK_ROUNDS = 60
"""Interleaved rounds of the latency measurement that picks the realization of a ratio search."""
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
    skipped: str | None = None
    """Why the candidate was not built (a student without the data for it, the search's time budget)."""
    lossless: bool = False
    """An fp32 chain of exact transforms that agreed with the original on every validation image."""
    selection: dict[str, Any] | None = None
    """Fidelity on the selection images (``selection.Evidence``: drop, its upper bound, agreement, its lower
    bound, images needed); the accuracy budget is judged on these."""
    confirmation: dict[str, Any] | None = None
    """The same on the confirmation images, which the choice did not use."""
    accuracy_verdict: str | None = None
    """Why the variant is outside the accuracy budget (None: within it)."""
    class_top1_drop: dict[str, float] | None = None
    """Top-1 drop per class (label index), in points, on all validation images of that class."""
    worst_class_drop: tuple[str, float] | None = None
    """The largest per-class drop among classes with at least ``MIN_CLASS_IMAGES`` validation images."""
    ratio_search: str | None = None
    """For a step of a pruning-ratio search: the searched candidate's name (its chain); None otherwise."""
    prune_ratio: float | None = None
    """For a step of a pruning-ratio search: the ``channel_prune`` ratio this variant was built with."""
    search_step: int | None = None
    """For a step of a pruning-ratio search: 1 for the first ratio tried, 2 for the next, ..."""

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
    selection: dict[str, Any] = field(default_factory=dict)
    """How the choice was judged: confidence, the selection/confirmation split, images per class, the variants
    that failed confirmation, and the validation images needed when no lossy variant could be shown."""
    not_tried: list[str] = field(default_factory=list)
    """Candidates not started for lack of time (``search.max_minutes``)."""
    max_minutes: float | None = None
    frontier: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Per pruning-ratio search (the searched candidate's name): each ratio tried, in ratio order, with its
    measured top-1, drop and its bound, agreement, latency and verdict (see ``frontier.py``)."""

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
    for key in ("top1_drop_ci95", "agreement_ci95", "worst_class_drop"):
        if data.get(key) is not None:
            data[key] = tuple(data[key])
    return VariantReport(**data)


@dataclass
class _Built:
    report: VariantReport
    predictor: Predictor


class SearchSpans:
    """The search's spans: ``compression.search``, a ``candidate <name>`` child per variant (the original
    too) carrying its measured figures, and under each ``build``, ``latency`` and ``fidelity``. Latency is
    measured interleaved across all variants at once, so every ``latency`` span covers that one interval."""

    def __init__(self, tracer: Tracer, model_name: str) -> None:
        self._tracer = tracer
        self.root = tracer.start_span("compression.search", attributes={"slimserve.model": model_name})
        self._candidates: dict[str, Span] = {}

    def candidate(self, name: str, techniques: list[str], realization: dict[str, Any] | None = None) -> None:
        attributes: dict[str, Any] = {"slimserve.candidate": name, "slimserve.techniques": techniques}
        for key, value in (realization or {}).items():
            if isinstance(value, (str, bool, int, float)):
                attributes[f"slimserve.realization.{key}"] = value
        context = trace.set_span_in_context(self.root)
        self._candidates[name] = self._tracer.start_span(f"candidate {name}", context=context, attributes=attributes)

    def step(self, name: str, step: str) -> AbstractContextManager[Span]:
        """A child of candidate ``name``, current for its duration (exceptions are recorded on it)."""
        if name not in self._candidates:
            return nullcontext(trace.INVALID_SPAN)
        context = trace.set_span_in_context(self._candidates[name])
        return self._tracer.start_as_current_span(step, context=context)

    def failed(self, name: str, error: str) -> None:
        if name in self._candidates:
            self._candidates[name].set_status(Status(StatusCode.ERROR, first_line(error)[:300]))

    def latency(self, names: list[str], start_ns: int, end_ns: int) -> None:
        for name in names:
            context = trace.set_span_in_context(self._candidates[name])
            span = self._tracer.start_span("latency", context=context, start_time=start_ns)
            span.set_attribute("slimserve.variants_interleaved", len(names))
            span.end(end_time=end_ns)

    def end(self, reports: list[VariantReport], chosen: str | None, error: BaseException | None = None) -> None:
        for report in reports:
            span = self._candidates.pop(report.name, None)
            if span is None:
                continue
            figures = {
                "slimserve.latency_p50_ms": report.latency_p50_ms,
                "slimserve.latency_p95_ms": report.latency_p95_ms,
                "slimserve.top1": report.top1,
                "slimserve.top1_drop": report.top1_drop,
                "slimserve.agreement": report.agreement,
                "slimserve.size_bytes": report.size_bytes,
                "slimserve.meets_budget": report.meets_budget,
                "slimserve.chosen": report.name == chosen,
            }
            span.set_attributes({key: value for key, value in figures.items() if value is not None})
            span.end()
        for span in self._candidates.values():
            span.end()
        if chosen is not None:
            self.root.set_attribute("slimserve.chosen", chosen)
        if error is not None:
            self.root.record_exception(error)
            self.root.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        self.root.end()


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
    tracer: Tracer | None = None,
    clock: Callable[[], float] = time.monotonic,
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

    ``tracer``: where the search's spans go (:class:`SearchSpans`); default ``trace.get_tracer(__name__)``,
    which records nothing unless the process configured a tracer provider.

    ``clock``: the wall clock ``search.max_minutes`` is counted on (seconds; tests pass a synthetic one).
    """
    spans = SearchSpans(tracer or trace.get_tracer(__name__), model_name)
    reports: list[VariantReport] = []
    try:
        report = _search(
            model,
            settings,
            data,
            out_dir,
            model_name=model_name,
            max_batch_size=max_batch_size,
            progress=progress,
            on_candidate_built=on_candidate_built,
            spans=spans,
            reports=reports,
            clock=clock,
        )
    except BaseException as exc:
        spans.end(reports, None, exc)
        raise
    spans.end(reports, report.chosen)
    return report


def _search(
    model: nn.Module,
    settings: CompressionSettings,
    data: EvalData,
    out_dir: Path,
    *,
    model_name: str,
    max_batch_size: int,
    progress: Callable[[str], None],
    on_candidate_built: Callable[[str, Predictor], None] | None,
    spans: SearchSpans,
    reports: list[VariantReport],
    clock: Callable[[], float] = time.monotonic,
) -> SearchReport:
    """The search itself; ``reports`` collects each variant's report as it is made (for the spans)."""
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
    spans.root.set_attribute("slimserve.device", str(device))
    spans.candidate(ORIGINAL, original.techniques)
    reports.append(original)
    built = {ORIGINAL: _Built(original, reference_predictor(model, device, input_shape, serve_batch))}
    score_fn, max_drop = _int8_scorer(model, data.calibration, settings, serve_batch)
    transformed: dict[str, nn.Module] = {}
    deadline = Deadline(settings.search.max_minutes, clock)
    tasks = plan(candidates)
    parts = split_validation(len(data.validation), settings.data.seed)
    judge = _Judge(data, settings, parts, serve_batch)
    listed: dict[str, list[str]] = {}
    """Per configured candidate, the variants it became (a ratio search: one per ratio tried)."""
    skipped: dict[str, VariantReport] = {}
    not_tried: list[str] = []
    built_candidates: dict[str, Candidate] = {}

    def build(candidate: Candidate, label: str) -> _Built | VariantReport:
        progress(f"{label} candidate {candidate.name}: {' -> '.join(candidate.techniques)}")
        fitted = deadline.fit(candidate)
        if fitted is not candidate:
            progress(
                f"{label} {candidate.name}: distillation cut to {training_seconds(fitted):.0f} s to end within the "
                f"time budget (search.max_minutes {settings.search.max_minutes})"
            )
            candidate = fitted
        task_started = clock()
        spans.candidate(candidate.name, candidate.techniques, candidate.realization.to_dict())
        with spans.step(candidate.name, "build") as build_span:
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
                build_span.set_status(Status(StatusCode.ERROR, first_line(result.error or "")[:300]))
        reports.append(result if isinstance(result, VariantReport) else result.report)
        built_candidates[candidate.name] = candidate
        if isinstance(result, VariantReport):
            spans.failed(candidate.name, result.error or "")
            progress(f"{label} {candidate.name} FAILED: {result.error}")
            built[candidate.name] = _Built(result, None)  # type: ignore[arg-type]
        else:
            built[candidate.name] = result
            if on_candidate_built is not None:
                on_candidate_built(candidate.name, result.predictor)
        deadline.record(candidate, clock() - task_started)
        return result

    for index, candidate in enumerate(tasks, 1):
        label = f"[{index}/{len(tasks)}]"
        reason = skip_reason(candidate, len(data.calibration), settings.search)
        if reason is None and not deadline.admits(candidate):
            reason = _out_of_time(settings, deadline, candidate)
            not_tried.append(candidate.name)
        if reason is not None:
            skipped[candidate.name] = _skipped_report(candidate, reason)
            progress(f"{label} {candidate.name} {reason}")
            continue
        progress(f"{label} {deadline.progress(tasks[index - 1 :])}")
        if candidate.ratio_search is None:
            build(candidate, label)
            listed[candidate.name] = [candidate.name]
            continue
        like = None
        if candidate.ratio_search.realization == "best":
            like = _best_realization(built, built_candidates, judge, example, progress)
        names, out_of_time = _search_ratio(
            candidate, like, build, judge, built[ORIGINAL].predictor, deadline, progress, label
        )
        listed[candidate.name] = names
        if out_of_time:
            not_tried.append(f"{candidate.name} (ratios after the {len(names)} tried)" if names else candidate.name)
        if not names:
            skipped[candidate.name] = _skipped_report(candidate, _out_of_time(settings, deadline, candidate))
            listed[candidate.name] = [candidate.name]

    working = {name: b for name, b in built.items() if b.report.error is None}
    progress(
        f"measuring latency of {len(working)} variants at batch {batch} on {device} "
        f"({settings.measurement.iterations} interleaved rounds)"
    )
    measuring = time.time_ns()
    latencies = measure_latency(
        {n: b.predictor for n, b in working.items()},
        example,
        warmup=settings.measurement.warmup,
        iterations=settings.measurement.iterations,
    )
    spans.latency(list(working), measuring, time.time_ns())
    exact = {name: cost_class(c) == LOSSLESS for name, c in built_candidates.items()}
    progress(
        f"measuring fidelity on {len(data.validation)} held-out images ({len(parts[0])} to select on, "
        f"{len(parts[1])} to confirm the choice on)"
    )
    with spans.step(ORIGINAL, "fidelity"):
        reference = judge.predictions(ORIGINAL, working[ORIGINAL].predictor)
    for name, b in working.items():
        b.report.latency_p50_ms = latencies[name].p50_ms
        b.report.latency_p95_ms = latencies[name].p95_ms
        with nullcontext() if name == ORIGINAL else spans.step(name, "fidelity"):
            predictions = judge.predictions(name, b.predictor)
            b.report.apply_fidelity(fidelity(predictions, reference, data.validation_labels))
            _judge_fidelity(b.report, predictions, reference, data, settings, parts, exact.get(name, False))

    measured = [_measured(b.report) for b in working.values()]
    budget = settings.budget
    for b in working.values():
        m = _measured(b.report)
        b.report.accuracy_verdict = accuracy_verdict(m, budget)
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
    reports_in_order = [
        built[name].report if name in built else skipped[name]
        for c in candidates
        for name in listed.get(c.name, [c.name])
    ]
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
        candidates=reports_in_order,
        chosen=choice.name,
        reason=choice.reason,
        budget_met=choice.budget_met,
        search_seconds=round(time.perf_counter() - started, 1),
        selection={
            "confidence": budget.confidence,
            "split_seed": settings.data.seed,
            "selection_images": len(parts[0]),
            "confirmation_images": len(parts[1]),
            "min_class_images": MIN_CLASS_IMAGES,
            "class_images": _class_images(data.validation_labels),
            "unconfirmed": list(choice.unconfirmed),
            "images_needed": choice.images_needed,
        },
        not_tried=not_tried,
        max_minutes=settings.search.max_minutes,
        frontier=frontier(reports_in_order),
    )


def _skipped_report(candidate: Candidate, reason: str) -> VariantReport:
    return VariantReport(
        candidate.name,
        candidate.techniques,
        [config_to_dict(s) for s in candidate.steps],
        candidate.realization.to_dict(),
        skipped=reason,
    )


def _out_of_time(settings: CompressionSettings, deadline: Deadline, candidate: Candidate) -> str:
    return (
        f"not tried: the search's time budget (search.max_minutes {settings.search.max_minutes}) would "
        f"be exceeded ({deadline.elapsed():.0f} s spent, about {deadline.expected(candidate):.0f} s expected)"
    )


class _Judge:
    """Each variant's top-1 on the validation images (computed once), and the verdict the search acts on
    while it runs: the accuracy budget judged on the selection images only (the confirmation images stay
    unused until the final choice)."""

    def __init__(
        self,
        data: EvalData,
        settings: CompressionSettings,
        parts: tuple[np.ndarray, np.ndarray],
        batch: int,
    ) -> None:
        self._data, self._budget, self._selection, self._batch = data, settings.budget, parts[0], batch
        self._predictions: dict[str, np.ndarray] = {}

    def predictions(self, name: str, predictor: Predictor) -> np.ndarray:
        if name not in self._predictions:
            self._predictions[name] = predict_top1(predictor, self._data.validation, self._batch)
        return self._predictions[name]

    def selection_verdict(
        self, name: str, predictor: Predictor, original: Predictor, exact: bool
    ) -> tuple[str | None, Evidence]:
        """(None or why the variant is outside the accuracy budget, its evidence) on the selection images."""
        part, labels = self._selection, self._data.validation_labels
        predictions, reference = self.predictions(name, predictor), self.predictions(ORIGINAL, original)
        part_labels = None if labels is None else labels[part]
        found = evidence(
            predictions[part],
            reference[part],
            part_labels,
            confidence=self._budget.confidence,
            max_drop=self._budget.max_accuracy_drop,
            min_agreement=self._budget.min_agreement,
        )
        worst = None
        if part_labels is not None:
            worst = _worst_class(class_drops(predictions[part], reference[part], part_labels))
        measured = Measured(
            name,
            0.0,
            None,
            found.top1_drop,
            found.agreement,
            selection=found,
            lossless=exact and bool((predictions == reference).all()),
            worst_class_drop=worst,
        )
        return accuracy_verdict(measured, self._budget), found


def _best_realization(
    built: dict[str, _Built],
    candidates: dict[str, Candidate],
    judge: _Judge,
    example: torch.Tensor,
    progress: Callable[[str], None],
) -> Candidate | None:
    """The candidate whose realization a ratio search uses: the fastest built so far that does not train,
    holds no storage technique and is within the accuracy budget on the selection images (a short
    interleaved latency measurement; the final figures come from the full one)."""
    original = built[ORIGINAL].predictor
    pool = [
        name
        for name, candidate in candidates.items()
        if built[name].report.error is None
        and cost_class(candidate) < TRAINING
        and not any(step.name in STORAGE_ONLY for step in candidate.steps)
    ]
    within = [
        name
        for name in pool
        if judge.selection_verdict(name, built[name].predictor, original, cost_class(candidates[name]) == LOSSLESS)[0]
        is None
    ]
    if not within:
        progress(
            "ratio search: no variant without training is within the accuracy budget; using the configured realization"
        )
        return None
    # NOTE: 15 rounds could not tell int8 ONNX Runtime (1.79 ms) from int8 inductor (2.11 ms) apart on a busy
    # machine (hard digits); the rounds cost milliseconds each.
    latencies = measure_latency(
        {name: built[name].predictor for name in within}, example, warmup=5, iterations=PICK_ROUNDS
    )
    best = min(within, key=lambda name: latencies[name].p50_ms)
    shown = ", ".join(f"{name} {latencies[name].p50_ms:.2f} ms" for name in within)
    progress(f"ratio search realizes each pruned model like {best} (p50 of those within the accuracy budget: {shown})")
    return candidates[best]


def _search_ratio(
    candidate: Candidate,
    like: Candidate | None,
    build: Callable[[Candidate, str], _Built | VariantReport],
    judge: _Judge,
    original: Predictor,
    deadline: Deadline,
    progress: Callable[[str], None],
    label: str,
) -> tuple[list[str], bool]:
    """Bisect the pruning ratio of ``candidate`` (see ``ratio_search.py``); each ratio tried is built and judged
    on the selection images. Returns the variants built, in the order tried, and whether time ran out."""
    assert candidate.ratio_search is not None
    bisection = RatioBisection(candidate.ratio_search)
    names: list[str] = []
    out_of_time = False
    while (ratio := bisection.next_ratio()) is not None:
        step = candidate.at_ratio(ratio, like)
        if not deadline.admits(step):
            out_of_time = True
            progress(f"{label} {candidate.name}: the time budget stops the ratio search ({bisection.describe()})")
            break
        result = build(
            step, f"{label} ratio {ratio:g} (step {bisection.steps + 1} of at most {bisection.settings.max_steps}):"
        )
        report = result if isinstance(result, VariantReport) else result.report
        report.ratio_search, report.prune_ratio, report.search_step = candidate.name, ratio, bisection.steps + 1
        names.append(step.name)
        if isinstance(result, VariantReport):
            bisection.record(ratio, within_budget=False)
            continue
        verdict, found = judge.selection_verdict(step.name, result.predictor, original, exact=False)
        bisection.record(ratio, within_budget=verdict is None)
        progress(
            f"{label} ratio {ratio:g}: agreement {found.agreement:.2%}"
            + ("" if found.top1_drop is None else f", drop {found.top1_drop:+.2f} pt (<= {found.top1_drop_upper:+.2f})")
            + f" on {found.images} selection images: "
            + ("within the accuracy budget" if verdict is None else f"outside it ({verdict})")
        )
    progress(f"{label} {candidate.name}: {bisection.describe()}")
    return names, out_of_time


def split_validation(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Validation indices to select on and to confirm the choice on: a seeded shuffle cut in half."""
    order = np.random.default_rng(seed).permutation(n)
    half = n - n // 2
    return np.sort(order[:half]), np.sort(order[half:])


def _class_images(labels: np.ndarray | None) -> dict[str, int]:
    if labels is None:
        return {}
    values, counts = np.unique(labels, return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)}


def _judge_fidelity(
    report: VariantReport,
    predictions: np.ndarray,
    reference: np.ndarray,
    data: EvalData,
    settings: CompressionSettings,
    parts: tuple[np.ndarray, np.ndarray],
    exact: bool,
) -> None:
    """The figures selection judges by: evidence on each part, per-class drops, losslessness."""
    budget, labels = settings.budget, data.validation_labels
    for attribute, part in zip(("selection", "confirmation"), parts, strict=True):
        found = evidence(
            predictions[part],
            reference[part],
            None if labels is None else labels[part],
            confidence=budget.confidence,
            max_drop=budget.max_accuracy_drop,
            min_agreement=budget.min_agreement,
        )
        setattr(report, attribute, asdict(found))
    report.lossless = exact and report.name != ORIGINAL and bool((predictions == reference).all())
    if labels is not None:
        per_class = class_drops(predictions, reference, labels)
        report.class_top1_drop = {label: drop for label, (_, drop) in per_class.items()}
        report.worst_class_drop = _worst_class(per_class)


def _worst_class(per_class: dict[str, tuple[int, float]]) -> tuple[str, float] | None:
    """The (class, drop) with the largest drop among classes with at least ``MIN_CLASS_IMAGES`` images."""
    judged = [(label, drop) for label, (count, drop) in per_class.items() if count >= MIN_CLASS_IMAGES]
    return max(judged, key=lambda item: item[1]) if judged else None


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
    return Measured(
        report.name,
        report.latency_p95_ms,
        report.top1,
        report.top1_drop,
        report.agreement,
        selection=Evidence(**report.selection) if report.selection else None,
        confirmation=Evidence(**report.confirmation) if report.confirmation else None,
        lossless=report.lossless,
        worst_class_drop=report.worst_class_drop,
    )


def _example(calibration: torch.Tensor, batch: int) -> torch.Tensor:
    repeats = -(-batch // len(calibration))
    return calibration.repeat(repeats, 1, 1, 1)[:batch].contiguous()
