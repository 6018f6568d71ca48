"""Searching a chain's pruning strength: bisection over a grid of channel-pruning ratios. Pure: no models.

The search assumes that a stronger pruning never recovers more accuracy than a weaker one (monotone), so
every ratio tried bounds the rest: a ratio within the accuracy budget clears every weaker one, a ratio
outside it rules out every stronger one. The first ratio tried is the grid's middle point; after a failure
with no pass yet the weakest ratio (``low``) is tried next, so a model that no ratio suits costs two builds,
not ``log2`` of the grid; otherwise each next ratio is the middle of the grid points still unknown, so
``high - low`` at ``resolution`` takes about ``log2((high - low) / resolution + 1)`` builds (one more when
the first ratio failed). The answer is the strongest ratio that passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compression.search.settings import RatioSearchSettings


@dataclass
class RatioBisection:
    """Which ratio to try next, given the verdicts so far."""

    settings: RatioSearchSettings
    passed: list[float] = field(default_factory=list)
    failed: list[float] = field(default_factory=list)

    @property
    def grid(self) -> list[float]:
        """The ratios that may be tried: ``low`` to ``high`` in steps of ``resolution`` (rounded to 4 places)."""
        s = self.settings
        count = int(round((s.high - s.low) / s.resolution)) + 1
        return [round(min(s.high, s.low + i * s.resolution), 4) for i in range(count)]

    @property
    def steps(self) -> int:
        return len(self.passed) + len(self.failed)

    def unknown(self) -> list[float]:
        """Grid ratios stronger than every pass and weaker than every failure."""
        strongest_pass = max(self.passed, default=float("-inf"))
        weakest_failure = min(self.failed, default=float("inf"))
        return [r for r in self.grid if strongest_pass < r < weakest_failure]

    def next_ratio(self) -> float | None:
        """The ratio to build next, or None when the boundary is found or the steps are spent."""
        if self.steps >= self.settings.max_steps:
            return None
        unknown = self.unknown()
        if not unknown:
            return None
        if self.failed and not self.passed:
            return unknown[0]
        return unknown[(len(unknown) - 1) // 2]

    def record(self, ratio: float, within_budget: bool) -> None:
        (self.passed if within_budget else self.failed).append(ratio)

    @property
    def best(self) -> float | None:
        """The strongest ratio within the budget so far (None: none yet)."""
        return max(self.passed, default=None)

    def describe(self) -> str:
        best = "none within the budget" if self.best is None else f"strongest within the budget {self.best:g}"
        failed = "" if not self.failed else f", weakest outside it {min(self.failed):g}"
        return f"{self.steps} ratios tried: {best}{failed}"
