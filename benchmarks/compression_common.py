"""What the CPU and GPU compression benchmarks share: progress lines, variant selection, the chosen row,
the fidelity table and writing the results.

``benchmarks.compression`` (CPU) and ``benchmarks.compression_gpu`` both import from here and neither
imports the other's helpers, so the benchmark modules form no import cycle
(tests/unit/test_benchmark_imports.py).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import table
from benchmarks.compression_fidelity import FidelityResult
from benchmarks.compression_latency import REFERENCE, Row, Variant
from compression.models.names import ORIGINAL
from compression.search.selection import Measured, choose
from compression.search.settings import BudgetSettings


def print_progress(message: str) -> None:
    """One timestamped line on stderr (the benchmarks' ``progress`` callback)."""
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def format_ms(value: float | None) -> str:
    """Milliseconds for a table cell: two decimals below 10, one above, ``-`` when not measured."""
    return "-" if value is None else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def chosen_row(rows: list[Row], fid: FidelityResult | None, batch: int = 1) -> tuple[str | None, str]:
    """The latency row ``choose`` would serve: part 2's val accuracies, this table's p95 at ``batch``."""
    if fid is None:
        return None, "no fidelity results (run without --skip-fidelity once)"
    accuracy = {v.name: v for v in [fid.report.original, *fid.report.candidates]}
    measured, row_of = [], {}
    for row in rows:
        name = row.variant.candidate
        if name is None or row.error or batch not in row.p95_ms:
            continue
        variant = accuracy.get(name)
        if variant is None or variant.error or variant.agreement is None:
            continue
        measured.append(Measured(name, row.p95_ms[batch], variant.top1, variant.top1_drop, variant.agreement))
        row_of[name] = row.variant.name
    if not any(m.name == ORIGINAL for m in measured):
        return None, "the reference failed"
    choice = choose(measured, BudgetSettings(**fid.report.budget))
    return row_of[choice.name], choice.reason


def selected(rows: list[Variant], names: list[str] | None) -> list[Variant]:
    """The reference and the rows named in ``names`` (every row when None); unknown names are an error."""
    if names is None:
        return rows
    unknown = sorted(set(names) - {v.name for v in rows})
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(v.name for v in rows)}")
    return [v for v in rows if v.name == REFERENCE or v.name in names]


def fidelity_table(fid: FidelityResult) -> str:
    report = fid.report
    base = report.original.latency_p50_ms
    out = []
    for v in [report.original, *report.candidates]:
        original: dict[str, Any] = {"top1": fid.test_top1, "top1_drop": 0.0, "agreement": 1.0}
        test = original if v.name == ORIGINAL else fid.test.get(v.name, {})
        if v.error:
            status = "FAILED: " + v.error[:160]
        elif v.skipped:
            status = v.skipped.split(":")[0]
        else:
            status = (
                "**chosen**"
                if v.name == report.chosen
                else "reference"
                if v.name == ORIGINAL
                else "within budget"
                if v.meets_budget
                else "outside budget"
            )
        ci = test.get("top1_drop_ci95")
        drop = (
            "-"
            if test.get("top1_drop") is None
            else f"{test['top1_drop']:+.1f}" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "")
        )
        val = "-" if v.top1 is None else f"{v.top1 * 100:.1f}% ({v.top1_drop:+.1f})"
        speedup = f"{base / v.latency_p50_ms:.2f}x" if base and v.latency_p50_ms else "-"
        out.append(
            [
                v.name,
                " -> ".join(v.techniques),
                format_ms(v.latency_p50_ms),
                speedup,
                val,
                _pct(test.get("top1")),
                drop,
                _pct(test.get("agreement")),
                test.get("error", "")[:80] or status,
            ]
        )
    return table(
        [
            "variant",
            "chain",
            f"b{report.batch_size} p50 ms",
            "speed-up",
            "val top-1 (drop pt)",
            "test top-1",
            "test drop pt [95% CI]",
            "test agreement",
            "status",
        ],
        out,
    )


def write_results(
    out: Path,
    stem: str,
    lines: list[str],
    verdict: str,
    started: float,
    latency: dict[str, list[Row]],
    chosen: dict[str, str | None],
) -> None:
    """Print the report with its summary, write it to ``out/<stem>.md`` and the raw figures to ``<stem>.json``."""
    lines = [*lines, "## Summary", "", verdict, "", f"_Benchmark wall time {time.perf_counter() - started:.0f} s._"]
    text = "\n".join(lines)
    print(text)
    (out / f"{stem}.md").write_text(text + "\n")
    raw = {
        arch: [
            {
                "variant": r.variant.name,
                "label": r.variant.label,
                "p50_ms": r.p50_ms,
                "p95_ms": r.p95_ms,
                "params": r.params,
                "macs": r.macs,
                "build_seconds": r.build_seconds,
                "error": r.error,
            }
            for r in rows
        ]
        for arch, rows in latency.items()
    }
    (out / f"{stem}.json").write_text(json.dumps({"latency": raw, "chosen": chosen}, indent=2))
