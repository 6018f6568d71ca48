"""A search's outputs for people: report.json (everything), report.md (a table), pareto.png (a plot)."""

from __future__ import annotations

from pathlib import Path

from compression.errors import first_line
from compression.search.runner import SearchReport, VariantReport

REPORT_JSON, REPORT_MD, PARETO_PNG = "report.json", "report.md", "pareto.png"


def write_reports(report: SearchReport, folder: Path) -> None:
    (folder / REPORT_JSON).write_text(report.to_json())
    (folder / REPORT_MD).write_text(markdown(report))
    pareto_plot(report, folder / PARETO_PNG)


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
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join("---" for _ in HEADERS) + "|",
        *("| " + " | ".join(row) + " |" for row in summary_rows(report)),
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
            f"A lossy variant is within the accuracy budget only when the bound of its {selection['confidence']:.0%} "
            f"interval is, on the {selection['selection_images']} selection images and then on the "
            f"{selection['confirmation_images']} confirmation images (a seeded half each, seed "
            f"{selection['split_seed']}). Drops as `point (<= upper bound) on images`; the worst class is judged "
            f"among classes with at least {selection['min_class_images']} validation images.",
            "",
            "| " + " | ".join(EVIDENCE_HEADERS) + " |",
            "|" + "|".join("---" for _ in EVIDENCE_HEADERS) + "|",
            *("| " + " | ".join(row) + " |" for row in evidence_rows(report)),
        ]
        if selection.get("images_needed"):
            lines += [
                "",
                f"About {selection['images_needed']} validation images would be needed to show a lossy "
                "variant within the budget at the observed rates.",
            ]
    skipped = [v for v in report.candidates if v.skipped]
    if skipped:
        lines += ["", "## Not built", "", *(f"- {v.name}: {v.skipped}" for v in skipped)]
    return "\n".join(lines) + "\n"


def pareto_plot(report: SearchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fidelity = lambda v: (v.top1 if v.top1 is not None else v.agreement) * 100  # noqa: E731
    # NOTE: (latency, variant) pairs, so the plotted latencies are typed as present.
    points = [(v.latency_p95_ms, v) for v in [report.original, *report.candidates] if v.latency_p95_ms is not None]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for latency, v in points:
        colour = "tab:red" if v.name == report.chosen else ("tab:green" if v.meets_budget else "tab:gray")
        ax.scatter(latency, fidelity(v), s=80 if v.name == report.chosen else 40, c=colour, zorder=3)
        ax.annotate(v.name, (latency, fidelity(v)), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front: list[tuple[float, VariantReport]] = []
    best = -1.0
    for latency, v in sorted(points, key=lambda point: point[0]):
        if fidelity(v) > best:
            front.append((latency, v))
            best = fidelity(v)
    ax.plot(
        [latency for latency, _ in front],
        [fidelity(v) for _, v in front],
        "--",
        c="tab:blue",
        lw=1,
        label="Pareto front",
    )
    if report.budget.get("max_latency_ms"):
        ax.axvline(report.budget["max_latency_ms"], c="tab:orange", lw=1, label="latency budget")
    ax.set_xscale("log")
    ax.set_xlabel(f"p95 latency, ms (batch {report.batch_size}, {report.device}, log scale)")
    ax.set_ylabel("top-1 %" if report.data["labelled"] else "agreement with original %")
    ax.set_title(f"{report.model}: chosen {report.chosen} (red)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
