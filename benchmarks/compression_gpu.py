"""``benchmarks.compression --device cuda``: what compression buys on a GPU, in one run.

    .venv/bin/python -m benchmarks.compression --device cuda                  # resnet50, mobilenet_v3_large
    .venv/bin/python -m benchmarks.compression --device cuda --models         # part 2 only (the search)
    .venv/bin/python -m benchmarks.compression --device cuda --models resnet50 --skip-fidelity

Part 2 (fidelity, run first): the trained resnet18-digits of ``compression_fidelity`` (``--dataset`` and
``--architecture`` pick another) goes through the
real ``run_search`` on the GPU with the default GPU candidates (top-1 drop <= 1 point and >= 99%
agreement on "val", objective fastest, latency at batch 64); every variant is then scored on "test".
Part 1 (throughput): each model with random weights at 3x224x224: the served original (fp32 eager,
NHWC on tensor-core GPUs), fp32 eager in NCHW, compiled fp32, and every default GPU candidate, built
with the project's code (cached under ``--out/cuda``) and timed with CUDA events at batch 1, 8 and 64,
interleaved; images/s is batch / p50. The chosen chain is what ``choose`` picks from part 2's figures
and the batch-64 p95. Tables go to stdout and ``--out/compression-cuda.md`` (raw figures in ``.json``).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import sys
import time

import torch

from benchmarks.common import table
from benchmarks.compression_common import chosen_row, fidelity_table, format_ms, print_progress, selected, write_results
from benchmarks.compression_fidelity import (
    GPU_BATCH,
    FidelityResult,
    architecture_of,
    cached_fidelity,
    recipe_for,
    run_fidelity,
    split_sizes,
)
from benchmarks.compression_latency import REFERENCE, Row, Variant, candidate_variants, labelled, run_latency
from compression.runtimes.cuda_support import CudaUnavailable, require_cuda
from compression.search.candidates import BN_FOLD

MODELS = ("resnet50", "mobilenet_v3_large")
BATCHES = (1, 8, GPU_BATCH)
GOAL_MODEL = "resnet50"
GOAL_SPEEDUP = 3.0
GOAL_AGREEMENT = 0.99
PRUNED_PREFIX = "pruned-r50-"


def gpu_variants() -> list[Variant]:
    """The served original, two fp32 baselines that are not search candidates, and every default GPU candidate."""
    return labelled(
        [
            Variant(
                REFERENCE, "fp32 eager, NHWC on tensor cores (reference: the served original)", (), None, "original"
            ),
            Variant("fp32-eager-nchw", "", (), {"runtime": "eager", "precision": "fp32"}),
            Variant("compiled-fp32", "", (BN_FOLD,), {"runtime": "inductor", "precision": "fp32"}),
            *candidate_variants("cuda"),
        ]
    )


def images_per_s(row: Row, batch: int) -> float | None:
    return batch * 1000 / row.p50_ms[batch] if batch in row.p50_ms else None


def speedup(row: Row, base: Row, batch: int) -> float | None:
    mine, theirs = images_per_s(row, batch), images_per_s(base, batch)
    return mine / theirs if mine and theirs else None


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def throughput_table(rows: list[Row], chosen: str | None, fid: FidelityResult | None) -> str:
    base = next(r for r in rows if r.variant.name == REFERENCE)
    agreement = {v.name: v.agreement for v in [fid.report.original, *fid.report.candidates]} if fid else {}
    out = []
    for row in rows:
        name = row.variant.name
        status = "FAILED: " + row.error[:160] if row.error else ""
        status = status or ("**chosen chain**" if name == chosen else "reference" if name == REFERENCE else "")
        agree = agreement.get(row.variant.candidate or "")
        out.append(
            [
                f"**{name}**" if name == chosen else name,
                row.variant.label,
                f"{row.params / 1e6:.2f}" if row.params else "-",
                f"{row.macs / 1e9:.3f}" if row.macs else "-",
                *[f"{ips:.0f}" if (ips := images_per_s(row, b)) else "-" for b in BATCHES],
                format_ms(row.p50_ms.get(GPU_BATCH)),
                _x(speedup(row, base, GPU_BATCH)),
                "-" if agree is None else f"{agree:.1%}",
                status,
            ]
        )
    headers = ["variant", "chain", "params M", "GMACs", *[f"b{b} img/s" for b in BATCHES]]
    headers += [f"b{GPU_BATCH} p50 ms", f"b{GPU_BATCH} speed-up", "agreement (digits val)", "status"]
    return table(headers, out)


def pruning_note(rows: list[Row]) -> str:
    """Each pruned chain against the same chain unpruned: MACs and measured batch-64 throughput."""
    by_name = {r.variant.name: r for r in rows}
    parts = []
    for row in rows:
        dense = by_name.get(row.variant.name.removeprefix(PRUNED_PREFIX))
        if not row.variant.name.startswith(PRUNED_PREFIX) or dense is None or not (row.macs and dense.macs):
            continue
        parts.append(
            f"`{row.variant.name}` has {row.macs / dense.macs:.2f}x the MACs of `{dense.variant.name}` and "
            f"{_x(speedup(row, dense, GPU_BATCH))} its batch-{GPU_BATCH} throughput"
        )
    return ("Structured pruning on this GPU: " + "; ".join(parts) + ".") if parts else ""


def summary(latency: dict[str, list[Row]], chosen: dict[str, str | None], fid: FidelityResult | None) -> str:
    rows = latency.get(GOAL_MODEL)
    name = chosen.get(GOAL_MODEL)
    if rows is None or name is None or fid is None:
        return f"The goal ({GOAL_MODEL}) was not evaluated: it needs {GOAL_MODEL}'s table and the fidelity search."
    by_name = {r.variant.name: r for r in rows}
    gain = speedup(by_name[name], by_name[REFERENCE], GPU_BATCH)
    candidate = by_name[name].variant.candidate or ""
    test = fid.test.get(candidate, {}) if candidate != "original" else {"agreement": 1.0}
    agreement = test.get("agreement")
    fast = gain is not None and gain >= GOAL_SPEEDUP
    faithful = agreement is not None and agreement >= GOAL_AGREEMENT
    verdict = "The goal was met." if fast and faithful else "The goal was NOT met."
    return (
        f"{verdict} {GOAL_MODEL}: the chosen chain `{name}` gives {_x(gain)} the fp32 eager throughput at batch "
        f"{GPU_BATCH} (goal >= {GOAL_SPEEDUP:.0f}x: {'met' if fast else 'NOT met'}); on the trained "
        f"{architecture_of(fid.recipe)}-{fid.recipe.get('dataset', 'digits')} it agrees with the original on "
        + ("an unknown share" if agreement is None else f"{agreement:.1%}")
        + f' of the "test" images (goal >= {GOAL_AGREEMENT:.0%}: {"met" if faithful else "NOT met"}). '
        f"The search on that model itself chose `{fid.report.chosen}` ({fid.report.reason})."
    )


def gpu_note(device: torch.device) -> str:
    props = torch.cuda.get_device_properties(device)
    return (
        f"{datetime.date.today().isoformat()}, {props.name} (sm_{props.major}{props.minor}, "
        f"{props.total_memory / 2**30:.0f} GiB), {os.cpu_count()} CPU cores; torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), Python {platform.python_version()}."
    )


def run_gpu(args: argparse.Namespace, cli_args: list[str]) -> None:
    """The GPU benchmark for ``benchmarks.compression --device cuda[:N]``; exits with the reason without CUDA."""
    try:
        device = require_cuda(args.device)
    except CudaUnavailable as exc:
        raise SystemExit(f"benchmarks.compression --device {args.device}: {exc}") from None
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    models = list(MODELS) if args.models is None else args.models
    args.out.mkdir(parents=True, exist_ok=True)
    target = str(device)
    recipe = recipe_for(args.dataset, args.architecture)
    fid = (
        cached_fidelity(args.out, recipe, device=target)
        if args.skip_fidelity
        else run_fidelity(
            args.out, progress=print_progress, fresh_search=args.fresh_search, recipe=recipe, device=target
        )
    )
    latency, chosen, reasons = {}, {}, {}
    for arch in models:
        latency[arch] = run_latency(
            arch,
            args.out / "cuda",
            iterations=args.iterations,
            progress=print_progress,
            device=target,
            batches=BATCHES,
            variant_list=selected(gpu_variants(), args.variants),
        )
        chosen[arch], reasons[arch] = chosen_row(latency[arch], fid, batch=GPU_BATCH)
    command = " ".join([".venv/bin/python -m benchmarks.compression", *cli_args])
    lines = ["# Compression benchmark on a GPU", "", f"Command: `{command}`", "", f"Machine: {gpu_note(device)}", ""]
    lines += [
        "## Throughput (random weights, 3x224x224, CUDA events, median of interleaved runs)",
        "",
        f"images/s = batch / p50, the predictor's whole call (pinned upload, forward, copy back). Speed-ups are "
        f"against the served fp32 original at batch {GPU_BATCH}. Training steps are off here (no KD: speed does "
        f"not depend on weight values). The chosen chain is what `choose` picks from the trained model's "
        f"val figures (below) and this table's batch-{GPU_BATCH} p95.",
        "",
    ]
    for arch in models:
        note = pruning_note(latency[arch])
        lines += [f"### {arch}", "", throughput_table(latency[arch], chosen[arch], fid), ""]
        lines += [f"Chosen: `{chosen[arch]}` ({reasons[arch]}).", "", *([note, ""] if note else [])]
    if fid is not None:
        _, n_val, n_test = split_sizes(fid.recipe)
        lines += [
            f"## Fidelity (torchvision {architecture_of(fid.recipe)} trained on "
            f"{fid.recipe.get('dataset', 'digits')}, searched on the GPU)",
            "",
            f"`run_search` with the default GPU candidates, top-1 drop <= 1 point and agreement >= 99% on "
            f'"val" ({n_val:,} images), objective fastest, latency at batch {GPU_BATCH} on the GPU '
            f'({fid.report.search_seconds:.0f} s); every variant scored afterwards on "test" ({n_test:,} images, '
            "disjoint).",
            "",
            fidelity_table(fid),
            "",
        ]
    write_results(args.out, "compression-cuda", lines, summary(latency, chosen, fid), started, latency, chosen)
    print(f"\nwritten: {args.out / 'compression-cuda.md'}", file=sys.stderr)
