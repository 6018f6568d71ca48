"""A search's outputs for people: report.json (everything), report.md (a table), pareto.png (a plot)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compression.errors import first_line
from compression.search.frontier import frontier, strongest_ratio
from compression.search.runner import SearchReport, VariantReport

REPORT_JSON, REPORT_MD, PARETO_PNG = "report.json", "report.md", "pareto.png"


def write_reports(report: SearchReport, folder: Path) -> None:
    (folder / REPORT_JSON).write_text(report.to_json())
    (folder / REPORT_MD).write_text(markdown(report))
    pareto_plot(report, folder / PARETO_PNG)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines."""
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _fidelity(v: VariantReport) -> str:
    if v.top1 is not None:
        drop = "" if v.top1_drop is None or v.name == "original" else f" ({v.top1_drop:+.2f} pt)"
        return f"{v.top1 * 100:.2f}%{drop}"
    return _fmt(v.agreement * 100 if v.agreement is not None else None, ".2f") + "% agree"


def summary_rows(report: SearchReport) -> list[list[str]]:
    base = report.original.latency_p50_ms
    rows = []
    for v in [report.original, *report.candidates]:
        speedup = f"{base / v.latency_p50_ms:.2f}x" if base and v.latency_p50_ms else "-"
        status = (
            "FAILED: " + first_line(v.error)[:80]
            if v.error
            else (
                first_line(v.skipped).split(":")[0]
                if v.skipped
                else (
                    "chosen" if v.name == report.chosen else ("within budget" if v.meets_budget else "outside budget")
                )
            )
        )
        rows.append(
            [
                v.name,
                " -> ".join(v.techniques),
                _fmt(v.latency_p50_ms, ".2f"),
                _fmt(v.latency_p95_ms, ".2f"),
                speedup,
                _fidelity(v) if v.agreement is not None else "-",
                _fmt(v.size_bytes / 1e6 if v.size_bytes else None, ".2f"),
                _fmt(v.compressed_bytes / 1e6 if v.compressed_bytes else None, ".2f"),
                _fmt(v.params / 1e6 if v.params else None, ".3f"),
                _fmt(v.macs / 1e6 if v.macs else None, ".1f"),
                status,
            ]
        )
    return rows


HEADERS = [
    "variant",
    "chain",
    "p50 ms",
    "p95 ms",
    "speed-up (p50)",
    "top-1 (drop)",
    "size MB",
    "zlib MB",
    "params M",
    "MMACs",
    "status",
]


def _limit(name: str, bound: str, value: object, unit: str = "") -> str:
    return f"no {name} limit" if value is None else f"{name} {bound} {value}{unit}"


def _bounds(part: dict | None) -> str:
    if not part:
        return "-"
    if part.get("top1_drop") is not None:
        return f"{part['top1_drop']:+.2f} pt (<= {part['top1_drop_upper']:+.2f}) on {part['images']}"
    return f"{part['agreement'] * 100:.2f}% agree (>= {part['agreement_lower'] * 100:.2f}%) on {part['images']}"


def evidence_rows(report: SearchReport) -> list[list[str]]:
    """Per measured variant: the selection and confirmation figures with their bounds, the worst class, why."""
    rows = []
    for v in report.candidates:
        if v.selection is None:
            continue
        worst = "-" if v.worst_class_drop is None else f"{v.worst_class_drop[0]}: {v.worst_class_drop[1]:+.2f} pt"
        verdict = "lossless" if v.lossless else (v.accuracy_verdict or "within the accuracy budget")
        rows.append([v.name, _bounds(v.selection), _bounds(v.confirmation), worst, verdict])
    return rows


EVIDENCE_HEADERS = ["variant", "selection images", "confirmation images", "worst class", "accuracy verdict"]


def report_frontier(report: SearchReport) -> dict[str, list[dict[str, Any]]]:
    """The report's pruning-ratio frontier; computed from its candidates when the report has none stored."""
    return report.frontier or frontier(report.candidates)


def frontier_rows(report: SearchReport, points: list[dict[str, Any]]) -> list[list[str]]:
    """One chain's ratios tried: MACs, p50, speed-up against the original's p50, fidelity and its bound, verdict."""
    base = report.original.latency_p50_ms
    rows = []
    for p in points:
        p50 = p["latency_p50_ms"]
        if p["top1"] is not None:
            drop = "" if p["top1_drop"] is None else f" ({p['top1_drop']:+.2f} pt)"
            fidelity, bound = f"{p['top1'] * 100:.2f}%{drop}", _fmt(p["top1_drop_upper"], "+.2f")
        else:
            fidelity = _fmt(p["agreement"] * 100 if p["agreement"] is not None else None, ".2f")
            bound = _fmt(p["agreement_lower"] * 100 if p.get("agreement_lower") is not None else None, ".2f")
        verdict = first_line(p["verdict"])[:100] + (" (chosen)" if p["variant"] == report.chosen else "")
        rows.append(
            [
                _fmt(p["ratio"], "g"),
                _fmt(p["step"], "d"),
                _fmt(p["macs"] / 1e6 if p["macs"] else None, ".1f"),
                _fmt(p50, ".2f"),
                f"{base / p50:.2f}x" if base and p50 else "-",
                fidelity,
                bound,
                verdict,
            ]
        )
    return rows


def frontier_lines(report: SearchReport) -> list[str]:
    """The "Pruning-ratio search" section of report.md (no lines when the search tried no ratios)."""
    chains = report_frontier(report)
    if not chains:
        return []
    labelled = report.data.get("labelled", True)
    fidelity, bound = ("top-1 (drop)", "drop upper bound, pt") if labelled else ("agreement %", "agreement lower %")
    headers = ["ratio", "step", "MMACs", "p50 ms", "speed-up vs original p50", fidelity, bound, "verdict"]
    lines = [
        "",
        "## Pruning-ratio search",
        "",
        "Channel-pruning ratios tried per searched chain (bisection: each ratio bounds the rest), in ratio order; "
        "`step` is the order they were tried in, the bound is on the selection images.",
    ]
    for chain, points in chains.items():
        best = strongest_ratio(points)
        if best is None:
            verdict = f"None of the {len(points)} ratios tried is within the accuracy budget."
        else:
            name = next((p["variant"] for p in points if p.get("strongest")), None)
            verdict = f"Strongest ratio within the accuracy budget: {best:g}" + (f" ({name})." if name else ".")
        lines += [
            "",
            f"### {chain}",
            "",
            *_table(headers, frontier_rows(report, points)),
            "",
            verdict,
        ]
    return lines


def markdown(report: SearchReport) -> str:
    budget = report.budget
    lines = [
        f"# Compression report: {report.model}",
        "",
        f"Target: {report.device}, batch {report.batch_size}. Budget: "
        f"{_limit('p95', '<=', budget['max_latency_ms'], ' ms')}, "
        f"{_limit('top-1 drop', '<=', budget['max_accuracy_drop'], ' pt')}, "
        f"{_limit('agreement', '>=', budget['min_agreement'])}, "
        f"objective {budget['objective']}, on_unmet {budget['on_unmet']}.",
        f"Data: {report.data['calibration_images']} calibration, {report.data['validation_images']} validation "
        f"images ({'labelled' if report.data['labelled'] else 'unlabelled: fidelity is agreement'}).",
        "",
        f"**Chosen: {report.chosen}** ({report.reason}).",
        "",
        *_table(HEADERS, summary_rows(report)),
        "",
        f"Search took {report.search_seconds:.0f} s. Drops are in percentage points with a 95% CI in "
        "report.json (paired per image). Storage techniques (magnitude pruning, clustering, clipping) shrink "
        "the zlib-compressed weights; they are not expected to speed up dense kernels.",
    ]
    selection = report.selection
    if selection:
        lines += [
            "",
            "## Accuracy evidence",
            "",
            f"A lossy variant is within the accuracy budget only when its one-sided {selection['confidence']:.0%} "
            f"bound is, on the {selection['selection_images']} selection images and then on the "
            f"{selection['confirmation_images']} confirmation images (a seeded half each, seed "
            f"{selection['split_seed']}). Drops as `point (<= upper bound) on images`; the worst class is judged "
            f"among classes with at least {selection['min_class_images']} validation images.",
            "",
            *_table(EVIDENCE_HEADERS, evidence_rows(report)),
        ]
        if selection.get("images_needed"):
            lines += [
                "",
                f"About {selection['images_needed']} validation images would be needed to show a lossy "
                "variant within the budget at the observed rates.",
            ]
    lines += frontier_lines(report)
    skipped = [v for v in report.candidates if v.skipped]
    if skipped:
        lines += ["", "## Not built", "", *(f"- {v.name}: {v.skipped}" for v in skipped)]
    return "\n".join(lines) + "\n"


CHAIN_COLOURS = ["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
"""Ratio-search lines; red, green, gray, blue and orange already mean chosen, within budget, outside it, the
Pareto front and the latency budget."""


def _fidelity_pct(top1: float | None, agreement: float | None) -> float | None:
    value = top1 if top1 is not None else agreement
    return None if value is None else value * 100


def fidelity_error(v: VariantReport) -> tuple[float, float] | None:
    """(below, above) the plotted fidelity, in points, from the 95% interval of the drop (or of the agreement).

    Top-1 is the original's minus the drop, so the drop's upper end is the top-1's lower end: below is
    ``upper - drop``, above is ``drop - lower``. Without labels, the agreement's interval, as a percentage.
    """
    if v.top1 is not None:
        if v.top1_drop is None or v.top1_drop_ci95 is None:
            return None
        low, high = v.top1_drop_ci95
        return max(high - v.top1_drop, 0.0), max(v.top1_drop - low, 0.0)
    if v.agreement is None or v.agreement_ci95 is None:
        return None
    low, high = v.agreement_ci95
    return max(v.agreement - low, 0.0) * 100, max(high - v.agreement, 0.0) * 100


def pareto_plot(report: SearchReport, path: Path) -> None:
    """Latency vs fidelity of every measured variant with its 95% interval, the Pareto front, and each
    pruning-ratio search's ratios as a line in ratio order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # NOTE: (latency, fidelity, variant) triples, so the plotted figures are typed as present.
    points = [
        (v.latency_p95_ms, fid, v)
        for v in [report.original, *report.candidates]
        if v.latency_p95_ms is not None and (fid := _fidelity_pct(v.top1, v.agreement)) is not None
    ]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for latency, fid, v in points:
        colour = "tab:red" if v.name == report.chosen else ("tab:green" if v.meets_budget else "tab:gray")
        error = fidelity_error(v)
        if error is not None and (error[0] or error[1]):
            ax.errorbar(
                latency,
                fid,
                yerr=[[error[0]], [error[1]]],
                fmt="none",
                ecolor=colour,
                elinewidth=0.8,
                capsize=2,
                alpha=0.6,
                zorder=2,
            )
        ax.scatter(latency, fid, s=80 if v.name == report.chosen else 40, c=colour, zorder=3)
        # NOTE: a ratio-search step is labelled by its ratio on its chain's line (below), not by its long name
        if v.ratio_search is None or v.name == report.chosen:
            ax.annotate(v.name, (latency, fid), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front: list[tuple[float, float]] = []
    best = -1.0
    for latency, fid, _ in sorted(points, key=lambda point: point[0]):
        if fid > best:
            front.append((latency, fid))
            best = fid
    ax.plot([x for x, _ in front], [y for _, y in front], "--", c="tab:blue", lw=1, label="Pareto front")
    for index, (chain, chain_points) in enumerate(report_frontier(report).items()):
        line = [
            (p["latency_p95_ms"], fid, p["ratio"], p["variant"])
            for p in chain_points
            if p["latency_p95_ms"] is not None and (fid := _fidelity_pct(p["top1"], p["agreement"])) is not None
        ]
        if not line:
            continue
        colour = CHAIN_COLOURS[index % len(CHAIN_COLOURS)]
        ax.plot(
            [x for x, _, _, _ in line],
            [y for _, y, _, _ in line],
            "-",
            c=colour,
            lw=1,
            alpha=0.8,
            zorder=1,
            label=f"ratio search: {chain}",
        )
        for i, (x, y, ratio, name) in enumerate(line):
            if name == report.chosen:
                continue  # labelled with its full name above
            # NOTE: alternate below/above so neighbouring ratios' labels do not sit on each other
            ax.annotate(
                f"r{ratio * 100:.0f}",
                (x, y),
                fontsize=6,
                color=colour,
                textcoords="offset points",
                xytext=(4, -9 if i % 2 else 3),
            )
    if report.budget.get("max_latency_ms"):
        ax.axvline(report.budget["max_latency_ms"], c="tab:orange", lw=1, label="latency budget")
    ax.set_xscale("log")
    ax.set_xlabel(f"p95 latency, ms (batch {report.batch_size}, {report.device}, log scale)")
    fidelity_label = "top-1 %" if report.data["labelled"] else "agreement with original %"
    ax.set_ylabel(f"{fidelity_label} (bars: 95% interval)")
    ax.set_title(f"{report.model}: chosen {report.chosen} (red)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
