"""What compression buys on CPU, in one run: latency of every variant on torchvision models, accuracy on a trained one.

    .venv/bin/python -m benchmarks.compression                      # resnet18, resnet50, mobilenet_v3_large
    .venv/bin/python -m benchmarks.compression --models resnet18 --iterations 30 --out build/benchmarks/compression
    .venv/bin/python -m benchmarks.compression --device cuda        # the GPU variant: benchmarks/compression_gpu.py
    .venv/bin/python -m benchmarks.compression --models --dataset hard-digits   # fidelity only, on hard digits
    .venv/bin/python -m benchmarks.compression --models --dataset hard-digits --architecture mobilenet_v3_small

Part 2 (fidelity, run first): a torchvision resnet18 trained on the digits images (32x32, cached) goes
through the real ``run_search`` (default CPU candidates, top-1 drop <= 1 point on "val", objective
fastest); every variant is then scored on the disjoint "test" split. ``--dataset hard-digits`` does this on
the hard digits of ``benchmarks.hard_digits`` (fp32 top-1 ~90%, 2,000 "val" and 1,000 "test" images)
instead, where compression has accuracy to lose; ``--architecture mobilenet_v3_small`` trains and searches
that torchvision model in resnet18's place (``compression_fidelity.ARCHITECTURES``). Part 1 (latency): each model with
random weights at 3x224x224, every variant built with the project's code (artifacts cached under
``--out/cache``), timed interleaved at batch 1 and 8. The "chosen chain" row of each latency table is
what the search's ``choose`` picks from part 2's accuracies and that table's batch-1 latencies.
Markdown tables and a summary go to stdout and ``--out/compression.md``.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import sys
import time
from pathlib import Path

import onnxruntime
import torch

from benchmarks.common import table
from benchmarks.compression_common import chosen_row, fidelity_table, format_ms, print_progress, selected, write_results
from benchmarks.compression_fidelity import (
    ARCHITECTURES,
    RECIPES,
    FidelityResult,
    architecture_of,
    cached_fidelity,
    recipe_for,
    run_fidelity,
    split_sizes,
)
from benchmarks.compression_latency import MAX_BATCH, REFERENCE, Row, run_latency, variants
from compression.models.names import ORIGINAL

log = logging.getLogger("benchmarks.compression")

MODELS = ("resnet18", "resnet50", "mobilenet_v3_large")
GOAL_MODELS = ("resnet18", "resnet50")
GOAL_SPEEDUP = 3.0
ORT_INT8 = "int8-onnxruntime"


def latency_table(rows: list[Row], chosen: str | None) -> str:
    base = next(r for r in rows if r.variant.name == REFERENCE)
    out = []
    for row in rows:
        speedups = [
            f"{base.p50_ms[b] / row.p50_ms[b]:.2f}x" if b in row.p50_ms and b in base.p50_ms else "-"
            for b in (1, MAX_BATCH)
        ]
        if row.error:
            status = "FAILED: " + row.error[:160]
        else:
            status = (
                "**chosen chain**"
                if row.variant.name == chosen
                else "reference"
                if row.variant.name == REFERENCE
                else ""
            )
        name = f"**{row.variant.name}**" if row.variant.name == chosen else row.variant.name
        out.append(
            [
                name,
                row.variant.label,
                f"{row.params / 1e6:.2f}" if row.params else "-",
                f"{row.macs / 1e9:.3f}" if row.macs else "-",
                format_ms(row.p50_ms.get(1)),
                format_ms(row.p50_ms.get(MAX_BATCH)),
                *speedups,
                status,
            ]
        )
    return table(
        [
            "variant",
            "chain",
            "params M",
            "GMACs",
            "b1 ms",
            f"b{MAX_BATCH} ms",
            "b1 speed-up",
            f"b{MAX_BATCH} speed-up",
            "status",
        ],
        out,
    )


def summary(latency: dict[str, list[Row]], chosen: dict[str, str | None], fid: FidelityResult | None) -> str:
    parts, verdicts = [], []
    for arch in GOAL_MODELS:
        if arch not in latency:
            parts.append(f"{arch} was not measured in this run.")
            continue
        rows = {r.variant.name: r for r in latency[arch]}
        name = chosen.get(arch)
        if name is None:
            parts.append(f"{arch}: no chosen chain could be determined.")
            verdicts.append(False)
            continue
        speedup = rows[REFERENCE].p50_ms[1] / rows[name].p50_ms[1]
        ort = rows.get(ORT_INT8)
        versus = rows[name].p50_ms[1] / ort.p50_ms[1] if ort and 1 in ort.p50_ms else None
        fast, not_slower = speedup >= GOAL_SPEEDUP, versus is not None and versus <= 1.0
        verdicts += [fast, not_slower]
        parts.append(
            f"{arch}: the chosen chain `{name}` is {speedup:.2f}x faster than fp32 eager at batch 1 "
            f"(goal >= {GOAL_SPEEDUP:.0f}x: {'met' if fast else 'NOT met'}) and takes "
            + (
                f"{versus:.2f}x the time of ONNX Runtime int8 (goal <= 1: {'met' if not_slower else 'NOT met'})."
                if versus is not None
                else "an unknown share of ONNX Runtime int8's time (that row failed)."
            )
        )
    if fid is not None:
        picks: dict[str, list[str]] = {}
        for arch, name in chosen.items():
            if name:
                picks.setdefault(name, []).append(arch)
        for pick, archs in picks.items():
            key = ORIGINAL if pick == REFERENCE else pick
            test = fid.test.get(key, {}) if key != ORIGINAL else {"top1_drop": 0.0}
            drop = test.get("top1_drop")
            ok = drop is not None and drop <= 1.0
            verdicts.append(ok)
            parts.append(
                f"On the trained {architecture_of(fid.recipe)} ({fid.recipe.get('dataset', 'digits')}, "
                f"{fid.recipe['image_size']} px) "
                f"`{pick}` "
                f"(chosen for {', '.join(archs)}) loses "
                + (
                    f"{drop:+.1f} points of test top-1 ({fid.test_top1:.1%} original; goal <= 1 point: "
                    f"{'met' if ok else 'NOT met'})."
                    if drop is not None
                    else "an unknown amount of top-1."
                )
            )
        parts.append(f"The search on that model itself chose `{fid.report.chosen}` ({fid.report.reason}).")
    overall = "All goals were met." if verdicts and all(verdicts) else "Not every goal was met."
    return " ".join([overall, *parts])


def machine_note() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f" {f}" in flags]
    return (
        f"{datetime.date.today().isoformat()}, {cpu}, {torch.get_num_threads()} torch threads "
        f"({', '.join(isa)}), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY') or 'unset'}, shared with other "
        f"work (timings vary +-10-15%, PyTorch's far more when another process is busy); "
        f"torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, Python {platform.python_version()}."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--models",
        nargs="*",
        default=None,
        help=f"torchvision architectures (default {' '.join(MODELS)}; on CUDA the GPU ones); none: fidelity only",
    )
    parser.add_argument("--device", default="cpu", help="cpu, or cuda[:N] for the GPU benchmark (compression_gpu.py)")
    parser.add_argument("--variants", nargs="+", help="time only these rows (the reference always runs)")
    parser.add_argument(
        "--skip-fidelity",
        action="store_true",
        help="skip training and the search (cached results in --out are still used)",
    )
    parser.add_argument("--fresh-search", action="store_true", help="redo the search even if results are cached")
    parser.add_argument(
        "--dataset",
        choices=sorted(RECIPES),
        default="digits",
        help="what the fidelity model is trained and searched on (hard-digits: fp32 top-1 ~90%%, not ~99%%)",
    )
    parser.add_argument(
        "--architecture",
        choices=ARCHITECTURES,
        default="resnet18",
        help="the torchvision model the fidelity part trains and searches (its own cached weights and results)",
    )
    parser.add_argument("--iterations", type=int, default=30, help="timed rounds per batch size")
    parser.add_argument("--out", type=Path, default=Path("build/benchmarks/compression"))
    parser.add_argument(
        "--omp-passive",
        action="store_true",
        help="OMP_WAIT_POLICY=PASSIVE: robust on a busy machine, slower PyTorch on a quiet one",
    )
    args = parser.parse_args(argv)
    cli_args = argv if argv is not None else sys.argv[1:]
    if args.device != "cpu":
        from benchmarks.compression_gpu import run_gpu

        run_gpu(args, cli_args)
        return
    args.models = list(MODELS) if args.models is None else args.models
    if args.omp_passive and os.environ.get("OMP_WAIT_POLICY") != "PASSIVE":
        # NOTE: libgomp reads the policy when torch loads, so the process starts over with it set.
        # Measured on this 2-core box: with GOMP's default policy, one other busy process makes PyTorch's
        # 2-thread pool collapse (resnet18 eager batch 1: 200-930 ms instead of ~50; ONNX Runtime, which
        # runs with allow_spinning=0, is unaffected); PASSIVE avoids the collapse but costs PyTorch
        # ~1.7x on a quiet machine (eager 52 -> 96 ms, int8 compiled 17 -> 30 ms). Neither is neutral.
        os.execve(
            sys.executable,
            [sys.executable, "-m", "benchmarks.compression", *cli_args],
            {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
        )
    load_at_start = os.getloadavg()[0]
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = recipe_for(args.dataset, args.architecture)
    fid = (
        cached_fidelity(args.out, recipe)
        if args.skip_fidelity
        else run_fidelity(args.out, progress=print_progress, fresh_search=args.fresh_search, recipe=recipe)
    )
    latency, chosen, reasons = {}, {}, {}
    for arch in args.models:
        latency[arch] = run_latency(
            arch,
            args.out,
            iterations=args.iterations,
            progress=print_progress,
            variant_list=selected(variants(), args.variants),
        )
        chosen[arch], reasons[arch] = chosen_row(latency[arch], fid)
    command = " ".join([".venv/bin/python -m benchmarks.compression", *cli_args])
    load = f"1-minute load average {load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    lines = ["# Compression benchmark", "", f"Command: `{command}`", "", f"Machine: {machine_note()} {load}.", ""]
    lines += [
        "## Latency (random weights, 3x224x224, median of interleaved runs)",
        "",
        "Speed-ups are against fp32 eager in the same run. Training steps are off here (no KD: latency "
        "does not depend on weight values); int8 rows use no float fallback. The chosen chain is what "
        "`choose` picks from the trained model's val accuracies (below) and this table's batch-1 p95.",
        "",
    ]
    for arch in args.models:
        lines += [
            f"### {arch}",
            "",
            latency_table(latency[arch], chosen[arch]),
            "",
            f"Chosen: `{chosen[arch]}` ({reasons[arch]}).",
            "",
        ]
    if fid is not None:
        dataset = fid.recipe.get("dataset", "digits")
        architecture = architecture_of(fid.recipe)
        n_train, n_val, n_test = split_sizes(fid.recipe)
        lines += [
            f"## Fidelity (torchvision {architecture} trained on {dataset})",
            "",
            f'{architecture} (num_classes=10) trained on the {n_train:,} "train" {dataset} at '
            f"{fid.recipe['image_size']}x{fid.recipe['image_size']} ({fid.recipe['epochs']} epochs"
            + (f", {fid.train_seconds:.0f} s" if fid.train_seconds else ", cached")
            + f"): val top-1 "
            f"{fid.val_top1:.1%}, test top-1 {fid.test_top1:.1%}. `run_search` with the default CPU "
            f'candidates, max_accuracy_drop 1.0 on "val" ({n_val:,} images), objective fastest, batch 1, '
            f'{min(fid.calibration_images, n_train)} calibration images; every variant scored afterwards on "test" '
            f"({n_test:,} images, disjoint). Latencies here are at 3x{fid.recipe['image_size']}x"
            f"{fid.recipe['image_size']}, measured by the search ({fid.report.search_seconds:.0f} s).",
            "",
            fidelity_table(fid),
            "",
        ]
    write_results(args.out, "compression", lines, summary(latency, chosen, fid), started, latency, chosen)


if __name__ == "__main__":
    main()
