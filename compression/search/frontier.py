"""The searched pruning frontier: per pruning-ratio search, every ratio tried with its measured figures.

A ratio search builds one variant per channel-pruning ratio it tries (``ratio_search``, ``prune_ratio`` and
``search_step`` set on its ``VariantReport``). :func:`frontier` gathers them per searched chain, in ascending
ratio, as plain dicts for report.json, report.md and the Pareto plot. Pure: no models, no torch; it reads
variants through :class:`FrontierVariant`, so the runner (which imports this module) is not imported here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from compression.errors import first_line

WITHIN = "within the accuracy budget"


class FrontierVariant(Protocol):
    """The fields of a ``runner.VariantReport`` the frontier reads (read-only, so any such dataclass fits)."""

    @property
    def name(self) -> str: ...
    @property
    def ratio_search(self) -> str | None: ...
    @property
    def prune_ratio(self) -> float | None: ...
    @property
    def search_step(self) -> int | None: ...
    @property
    def latency_p50_ms(self) -> float | None: ...
    @property
    def latency_p95_ms(self) -> float | None: ...
    @property
    def top1(self) -> float | None: ...
    @property
    def top1_drop(self) -> float | None: ...
    @property
    def agreement(self) -> float | None: ...
    @property
    def macs(self) -> int | None: ...
    @property
    def selection(self) -> dict[str, Any] | None: ...
    @property
    def accuracy_verdict(self) -> str | None: ...
    @property
    def error(self) -> str | None: ...
    @property
    def skipped(self) -> str | None: ...


def _measured(v: FrontierVariant) -> bool:
    return v.latency_p95_ms is not None and (v.top1 is not None or v.agreement is not None)


def _verdict(v: FrontierVariant) -> str:
    if v.error:
        return "FAILED: " + first_line(v.error)
    if v.skipped:
        return "not built: " + first_line(v.skipped)
    if not _measured(v):
        return "not measured"
    return v.accuracy_verdict or WITHIN


def point(v: FrontierVariant) -> dict[str, Any]:
    """One ratio tried: its figures, whether it is within the accuracy budget and why not.

    ``within_accuracy``: built, measured and no ``accuracy_verdict``. ``strongest`` is set by :func:`frontier`.
    """
    selection = v.selection or {}
    return {
        "variant": v.name,
        "ratio": v.prune_ratio,
        "step": v.search_step,
        "top1": v.top1,
        "top1_drop": v.top1_drop,
        "top1_drop_upper": selection.get("top1_drop_upper"),
        "agreement": v.agreement,
        "agreement_lower": selection.get("agreement_lower"),
        "latency_p50_ms": v.latency_p50_ms,
        "latency_p95_ms": v.latency_p95_ms,
        "macs": v.macs,
        "within_accuracy": not v.error and not v.skipped and _measured(v) and v.accuracy_verdict is None,
        "verdict": _verdict(v),
        "strongest": False,
    }


def strongest_ratio(points: Iterable[Mapping[str, Any]]) -> float | None:
    """The strongest (largest) ratio within the accuracy budget among one chain's points; None: none was."""
    return max((p["ratio"] for p in points if p["within_accuracy"]), default=None)


def strongest_ratios(chains: Mapping[str, Iterable[Mapping[str, Any]]]) -> dict[str, float | None]:
    """Per searched chain (a :func:`frontier`), its strongest ratio within the accuracy budget, or None."""
    return {chain: strongest_ratio(points) for chain, points in chains.items()}


def frontier(variants: Iterable[FrontierVariant]) -> dict[str, list[dict[str, Any]]]:
    """Per searched chain (``ratio_search``, in first-seen order): its points in ascending ratio (then step).

    Variants of no ratio search, or without a ratio, are left out. The strongest ratio within the accuracy
    budget has ``strongest: True`` (at most one point per chain).
    """
    chains: dict[str, list[dict[str, Any]]] = {}
    for v in variants:
        if v.ratio_search is not None and v.prune_ratio is not None:
            chains.setdefault(v.ratio_search, []).append(point(v))
    for points in chains.values():
        points.sort(key=lambda p: (p["ratio"], p["step"] if p["step"] is not None else 0))
        best = strongest_ratio(points)
        flagged = next((p for p in reversed(points) if p["within_accuracy"] and p["ratio"] == best), None)
        if flagged is not None:
            flagged["strongest"] = True
    return chains
