"""The order of a search and its wall-clock budget: cheap candidates first, the search anytime.

The search works through an ordered list of tasks (one candidate each; a pruning-ratio search builds one
variant per ratio it tries, each a task of its own), cheapest first: lossless fp32 runtimes, then chains
that do not train (int8, storage techniques), then chains that train (pruning with recovery, students). With
``search.max_minutes`` a task is started only when it is expected to finish within the budget, so
whatever was built by then is measured and the best of it chosen; the tasks left out are reported.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from compression.search.candidates import Candidate
from compression.search.settings import SearchSettings

EXACT_STEPS = {"bn_fold"}
"""Transforms that compute the same function (up to float rounding)."""
TRAINING_STEPS = {"channel_prune", "magnitude_prune", "student"}
LOSSLESS, NO_TRAINING, TRAINING = 0, 1, 2
TRAINING_SHARE = 0.75
"""Of the time left, the share a candidate's distillation may take when the time budget binds (the rest is for
pruning, export and calibration)."""
MIN_TRAINING_S = 5.0


def cost_class(candidate: Candidate) -> int:
    """0: exact transforms realized in fp32; 1: no training (int8, half precision, storage techniques);
    2: a step that trains (or may train)."""
    steps = {step.name for step in candidate.steps}
    if steps <= EXACT_STEPS and candidate.realization.precision == "fp32":
        return LOSSLESS
    return TRAINING if steps & TRAINING_STEPS else NO_TRAINING


def plan(candidates: list[Candidate]) -> list[Candidate]:
    """Cheapest first; the configured order within a cost class."""
    return sorted(candidates, key=cost_class)


def skip_reason(candidate: Candidate, calibration_images: int, settings: SearchSettings) -> str | None:
    """Why ``candidate`` is not worth building on this data, or None."""
    for step in candidate.steps:
        if step.name == "student" and getattr(step, "weights_path", None) is None:
            if calibration_images < settings.student_min_images:
                return (
                    f"skipped: a student trained from scratch needs at least {settings.student_min_images} "
                    f"calibration images (search.student_min_images) and there are {calibration_images}; "
                    "give more images or a pre-distilled student (weights_path)"
                )
    return None


def _trains(step: object) -> bool:
    distillation = getattr(step, "distillation", None)
    return distillation is not None and distillation.epochs > 0 and getattr(step, "weights_path", None) is None


def training_seconds(candidate: Candidate) -> float:
    """The distillation time budgets of the steps that train."""
    return sum(step.distillation.time_budget_s for step in candidate.steps if _trains(step))  # type: ignore[attr-defined]


@dataclass
class Deadline:
    """The search's wall clock: what has been spent, what a task is expected to take, and the ETA."""

    max_minutes: float | None
    clock: Callable[[], float] = time.monotonic
    started: float = field(init=False)
    durations: dict[int, list[float]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.started = self.clock()

    @property
    def limit_s(self) -> float | None:
        return None if self.max_minutes is None else self.max_minutes * 60

    def elapsed(self) -> float:
        return self.clock() - self.started

    def expected(self, candidate: Candidate) -> float:
        """Seconds ``candidate`` is expected to take: the mean of its cost class so far; for a class not yet
        seen, its steps' distillation time budgets, or the mean of every task so far."""
        same = self.durations.get(cost_class(candidate))
        if same:
            return sum(same) / len(same)
        every = [d for ds in self.durations.values() for d in ds]
        return max(training_seconds(candidate), sum(every) / len(every) if every else 0.0)

    def admits(self, candidate: Candidate) -> bool:
        limit = self.limit_s
        return limit is None or self.elapsed() + self.expected(candidate) <= limit

    def fit(self, candidate: Candidate) -> Candidate:
        """``candidate`` with its distillation time budgets cut to :data:`TRAINING_SHARE` of the time left, when
        they would not fit in it (so a started candidate ends near the budget instead of past it)."""
        limit, training = self.limit_s, training_seconds(candidate)
        if limit is None or training == 0:
            return candidate
        allowed = max(MIN_TRAINING_S, (limit - self.elapsed()) * TRAINING_SHARE)
        if training <= allowed:
            return candidate
        scale = allowed / training
        steps = tuple(
            dataclasses.replace(
                step,
                distillation=dataclasses.replace(  # type: ignore[attr-defined]
                    step.distillation, time_budget_s=round(step.distillation.time_budget_s * scale, 1)
                ),
            )
            if _trains(step)
            else step
            for step in candidate.steps
        )
        return dataclasses.replace(candidate, steps=steps)

    def record(self, candidate: Candidate, seconds: float) -> None:
        self.durations.setdefault(cost_class(candidate), []).append(seconds)

    def eta(self, remaining: list[Candidate]) -> float:
        """Seconds until the remaining tasks are done, as expected now (capped by the budget); a ratio search
        counts as many tasks as the ratios it may build."""
        total = sum(self.expected(c) * (c.ratio_search.max_steps if c.ratio_search else 1) for c in remaining)
        limit = self.limit_s
        return total if limit is None else max(0.0, min(total, limit - self.elapsed()))

    def progress(self, remaining: list[Candidate]) -> str:
        limit = "" if self.limit_s is None else f" of {self.limit_s:.0f} s"
        return f"elapsed {self.elapsed():.0f} s{limit}, ETA {self.eta(remaining):.0f} s for {len(remaining)} left"
