"""Latency part of ``benchmarks.compression``: every variant of a random-weight torchvision model at 224 px.

Variants are built with the project's own code (``compression.techniques.registry.apply`` + ``build_predictor``)
into ``<out>/cache/<arch>/<variant>`` and reloaded with ``load_predictor`` on later runs; they are then
timed side by side with ``measure_latency`` (round-robin, so they share the machine's noise).
Training steps (channel-pruning recovery, student distillation, sparse fine-tuning) are switched off:
latency does not depend on the weights' values, and fidelity is measured on a trained model instead.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from compression.context import CompressionContext
from compression.runtimes.eager import reference_predictor
from compression.runtimes.predictor import Predictor
from compression.runtimes.realization import RealizationConfig, build_predictor, load_predictor
from compression.search.candidates import BN_FOLD, default_candidates
from compression.search.latency import measure_latency
from compression.search.runner import training_threads
from compression.techniques import analysis
from compression.techniques.registry import apply, config_from_dict

log = logging.getLogger("benchmarks.compression")

REFERENCE = "fp32-eager"
IMAGE_SHAPE = (3, 224, 224)
MAX_BATCH = 8
CALIBRATION_IMAGES = 32
# NOTE: bump when the way the random model or a variant is made changes: it names the cache folder.
CACHE_VERSION = "v2"
_SIDECAR = "benchmark.json"
# NOTE: the techniques that train (a ``distillation`` block): epochs zeroed here (speed does not depend on them).
_TRAINING = {"channel_prune", "magnitude_prune", "student"}


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    steps: tuple[dict[str, Any], ...]
    realization: dict[str, Any] | None
    """None: the in-memory original as the server serves it uncompressed (``reference_predictor``)."""
    candidate: str | None = None
    """The default CPU candidate this row realizes (part 2 gives its accuracy), if any."""


@dataclass
class Row:
    variant: Variant
    p50_ms: dict[int, float] = field(default_factory=dict)
    p95_ms: dict[int, float] = field(default_factory=dict)
    error: str | None = None
    params: int | None = None
    macs: int | None = None
    build_seconds: float | None = None
    """None when the artifact was reused from the cache."""


def _untrained(step: dict[str, Any]) -> dict[str, Any]:
    if step["technique"] not in _TRAINING:
        return dict(step)
    return {**step, "distillation": {**step.get("distillation", {}), "epochs": 0}}


def _label(steps: list[dict[str, Any]], realization: dict[str, Any]) -> str:
    def name(step: dict[str, Any]) -> str:
        amount = step.get("ratio", step.get("sparsity"))
        detail = f" {amount:.0%}" if amount is not None else (f" {step['bits']}-bit" if "bits" in step else "")
        return step["technique"] + detail

    names = [name(s) for s in steps]
    extra = " channels_last" if realization.get("channels_last") else ""
    extra += " cuda-graphs" if realization.get("cuda_graphs") else ""
    return " + ".join([*names, f"{realization['runtime']} {realization['precision']}{extra}"])


def variants() -> list[Variant]:
    """The reference, two eager baselines that are not search candidates, and every default CPU candidate."""
    prune = {"technique": "channel_prune", "ratio": 0.5}
    eager_cl = {"runtime": "eager", "precision": "fp32", "channels_last": True}
    rows = [
        Variant(REFERENCE, "fp32 eager (reference)", (), None, candidate="original"),
        Variant("bnfold-eager-cl", "", (BN_FOLD,), eager_cl),
        Variant("pruned-r50-eager-cl", "", (_untrained(prune), BN_FOLD), eager_cl),
    ]
    return labelled(rows + candidate_variants("cpu"))


LATENCY_RATIOS = (0.3, 0.5)
"""A ratio-search candidate has no ratio of its own: its latency is shown at these ratios, realized like each of
:data:`PRUNED_LIKE` (the realizations its search picks from in practice)."""
PRUNED_LIKE = {"cpu": ("onnxruntime-fp32", "int8-onnxruntime"), "cuda": ("compiled-fp16", "fp16-cudagraphs")}


def candidate_variants(device: str) -> list[Variant]:
    """Every default candidate for ``device``, training steps off; a ratio search at :data:`LATENCY_RATIOS`
    realized like :data:`PRUNED_LIKE` (named as the search names the ratios it tries)."""
    defaults = default_candidates(device)
    likes = PRUNED_LIKE["cuda" if device.startswith("cuda") else "cpu"]
    untrained = [c for c in defaults if c.name in likes]
    rows = []
    for c in defaults:
        if c.ratio_search is None:
            rows.append(Variant(c.name, "", tuple(_untrained(s) for s in c.steps), c.realization, candidate=c.name))
            continue
        for ratio in LATENCY_RATIOS:
            pruned = [{**s, "ratio": ratio} if s["technique"] == "channel_prune" else s for s in c.steps]
            for like in untrained:
                steps = pruned + [s for s in like.steps if s not in pruned]
                name = f"{c.name}-r{round(ratio * 100):02d}-{like.name}"
                rows.append(Variant(name, "", tuple(_untrained(s) for s in steps), like.realization, candidate=name))
    return rows


def labelled(rows: list[Variant]) -> list[Variant]:
    """``rows`` with a chain label made from the steps wherever none is given."""
    return [
        v
        if v.label
        else Variant(v.name, _label(list(v.steps), v.realization or {}), v.steps, v.realization, v.candidate)
        for v in rows
    ]


def random_model(arch: str, seed: int = 0) -> nn.Module:
    """``arch`` with random weights and BatchNorm statistics re-estimated on random inputs.

    NOTE: with the initial running statistics (mean 0, var 1) activations grow layer after layer; the
    re-estimated ones keep them in a realistic range, which int8 calibration needs.
    """
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, weights=None)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
    model.train()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, *IMAGE_SHAPE, generator=gen))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def _inputs(rows: int = MAX_BATCH, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, *IMAGE_SHAPE, generator=gen), torch.randn(CALIBRATION_IMAGES, *IMAGE_SHAPE, generator=gen)


class _Chains:
    """Applies technique chains, building each shared prefix once (prune -> eager/ORT fp32/ORT int8)."""

    def __init__(self, model: nn.Module, ctx: CompressionContext) -> None:
        self.model, self.ctx = model, ctx
        self._done: dict[str, nn.Module] = {}

    def __call__(self, steps: tuple[dict[str, Any], ...]) -> nn.Module:
        current = self.model
        for depth in range(1, len(steps) + 1):
            key = json.dumps(steps[:depth], sort_keys=True)
            if key not in self._done:
                with training_threads():
                    self._done[key] = apply(current, config_from_dict(steps[depth - 1]), self.ctx).eval()
            current = self._done[key]
        return current


def _predictor(
    variant: Variant,
    chains: _Chains,
    ctx: CompressionContext,
    folder: Path,
    inductor_cache: Path,
    row: Row,
    max_batch: int = MAX_BATCH,
) -> Predictor:
    if variant.realization is None:
        model = chains(())
        row.params, row.macs = analysis.count_params(model), analysis.count_macs(model, ctx.example_inputs[:1])
        return reference_predictor(model, ctx.device, IMAGE_SHAPE, max_batch)
    sidecar = folder / _SIDECAR
    try:
        predictor = load_predictor(folder, ctx.device)
        info = json.loads(sidecar.read_text())
        row.params, row.macs = info.get("params"), info.get("macs")
        ctx.progress(f"{variant.name}: reusing {folder}")
        return predictor
    except Exception as exc:  # noqa: BLE001 - anything short of a loadable artifact means: build it
        why = "not built yet" if not (folder / "manifest.json").exists() else f"{type(exc).__name__}: {exc}"
        ctx.progress(f"{variant.name}: building ({why[:200]})")
    started = time.perf_counter()
    model = chains(variant.steps)
    predictor = build_predictor(
        model,
        RealizationConfig.from_dict(variant.realization),
        ctx,
        folder,
        max_batch_size=max_batch,
        cache_dir=inductor_cache,
    )
    row.build_seconds = round(time.perf_counter() - started, 1)
    row.params, row.macs = analysis.count_params(model), analysis.count_macs(model, ctx.example_inputs[:1])
    sidecar.write_text(json.dumps({"params": row.params, "macs": row.macs, "build_seconds": row.build_seconds}))
    return predictor


def run_latency(
    arch: str,
    out: Path,
    *,
    iterations: int,
    progress: Callable[[str], None],
    device: str = "cpu",
    batches: tuple[int, ...] = (1, MAX_BATCH),
    variant_list: list[Variant] | None = None,
) -> list[Row]:
    """Build (or reload) every variant of ``arch`` for ``device`` and time them all at each of ``batches``."""
    max_batch = max(batches)
    example, calibration = _inputs(max_batch)
    model = random_model(arch)
    ctx = CompressionContext(
        calibration_inputs=calibration,
        example_inputs=example,
        teacher=model,
        device=torch.device(device),
        progress=lambda m: progress(f"[{arch}] {m}"),
    )
    chains = _Chains(model, ctx)
    cache = out / "cache" / CACHE_VERSION
    rows, predictors = [], {}
    for variant in variant_list or variants():
        row = Row(variant)
        rows.append(row)
        try:
            predictors[variant.name] = _predictor(
                variant, chains, ctx, cache / arch / variant.name, cache / "inductor", row, max_batch
            )
        except Exception as exc:  # noqa: BLE001 - a failing variant is a result, not a crash
            log.debug("%s %s failed", arch, variant.name, exc_info=True)
            row.error = f"{type(exc).__name__}: {exc}".replace("\n", " ")
            ctx.progress(f"{variant.name} FAILED: {row.error[:300]}")
    del chains  # NOTE: frees the transformed models; the predictors hold what they need
    for batch in batches:
        ctx.progress(f"timing {len(predictors)} variants at batch {batch}, {iterations} interleaved rounds")
        started = time.perf_counter()
        stats = measure_latency(
            predictors, example[:batch].contiguous(), warmup=3 if batch > 1 else 5, iterations=iterations
        )
        p50s = ", ".join(f"{name} {result.p50_ms:.2f}" for name, result in stats.items())
        ctx.progress(f"timed batch {batch} in {time.perf_counter() - started:.0f} s; p50 ms: {p50s}")
        for row in rows:
            if row.variant.name in stats:
                row.p50_ms[batch] = stats[row.variant.name].p50_ms
                row.p95_ms[batch] = stats[row.variant.name].p95_ms
    return rows
