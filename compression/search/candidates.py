"""The search space: candidate chains of techniques, each ending in a realization (runtime + precision).

The defaults follow what was measured on each kind of device (docs/compression.md): on CPUs the
runtime matters as much as the technique (ONNX Runtime and AOTInductor beat eager; int8 pays; fp16
and bf16 do not), on GPUs half precision and compilation are the main levers.

Structured pruning is one ratio search per device (``pruned``): its ratio is bisected within the accuracy
budget and each pruned model is realized like the fastest unpruned candidate within the budget (int8 ONNX
Runtime with its float fallback on this CPU when int8 passes, else a lossless fp32 runtime).

GPU defaults (not yet measured on a GPU: benchmarks/GPU-TODO.md): fp16 and bf16 with BN folded
first, eager in NHWC (tensor cores' native layout), with and without CUDA graphs (launch overhead
dominates small batches), and AOTInductor-compiled; structured pruning with channel counts kept at
multiples of 8 (tensor-core tiles; fewer MACs is not always faster there, so its latency is measured
like any other); a distilled student. No int8: without a TensorRT path int8 CNN kernels on GPUs are
usually slower than fp16 (the inductor int8 quantizer is X86-only, ONNX Runtime's CUDA provider
runs QDQ models through float kernels); add an int8 candidate explicitly to measure it anyway.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from compression.runtimes.realization import RealizationConfig
from compression.search.settings import CandidateSettings, RatioSearchSettings
from compression.techniques.registry import config_from_dict

BN_FOLD: dict[str, Any] = {"technique": "bn_fold"}
PRUNE: dict[str, Any] = {"technique": "channel_prune", "sensitivity_scan": True, "round_to": 8}
"""Channel counts kept at multiples of 8: ONNX Runtime's fp32 convolutions on AVX2 work on blocks of 8
channels (NCHWc) and tensor cores on tiles of 8. Measured on resnet18 at 32x32, ratio 0.2, ONNX Runtime
fp32: 2.78 ms unrounded (slower than the unpruned 2.21 ms) against 1.46 ms rounded to 8 (docs/benchmarks.md)."""
SEARCH_RATIO: dict[str, Any] = {}
"""A ratio search with its defaults: 0.1 to 0.8, at most 4 ratios built, each realized like the fastest
unpruned candidate within the accuracy budget."""
STUDENT: dict[str, Any] = {"technique": "student", "architecture": "depthwise_separable"}


def _candidate(
    name: str,
    steps: list[dict[str, Any]],
    runtime: str,
    precision: str,
    ratio_search: dict[str, Any] | None = None,
    **options: Any,
) -> CandidateSettings:
    return CandidateSettings(
        name=name,
        steps=steps,
        realization={"runtime": runtime, "precision": precision, **options},
        ratio_search=ratio_search,
    )


def default_candidates(device: str) -> list[CandidateSettings]:
    if device.startswith("cuda"):
        return [
            _candidate("fp16", [BN_FOLD], "eager", "fp16", channels_last=True),
            _candidate("bf16", [BN_FOLD], "eager", "bf16", channels_last=True),
            _candidate("fp16-cudagraphs", [BN_FOLD], "eager", "fp16", channels_last=True, cuda_graphs=True),
            _candidate("compiled-fp16", [BN_FOLD], "inductor", "fp16"),
            _candidate("compiled-bf16", [BN_FOLD], "inductor", "bf16"),
            _candidate("pruned", [PRUNE, BN_FOLD], "inductor", "fp16", SEARCH_RATIO),
            _candidate("student-compiled-fp16", [STUDENT, BN_FOLD], "inductor", "fp16"),
        ]
    return [
        _candidate("onnxruntime-fp32", [BN_FOLD], "onnxruntime", "fp32"),
        _candidate("compiled-fp32", [BN_FOLD], "inductor", "fp32"),
        _candidate("int8-onnxruntime", [], "onnxruntime", "int8"),
        _candidate("int8-compiled", [], "inductor", "int8"),
        _candidate("pruned", [PRUNE], "onnxruntime", "fp32", SEARCH_RATIO),
        _candidate("student-int8-onnxruntime", [STUDENT], "onnxruntime", "int8"),
        # Storage techniques: they shrink the compressed file, not the latency of dense kernels.
        _candidate(
            "sparse80",
            [{"technique": "magnitude_prune", "sparsity": 0.8, "distillation": {"epochs": 3}}],
            "eager",
            "fp32",
        ),
        _candidate("clustered4bit", [{"technique": "weight_cluster", "bits": 4}], "eager", "fp32"),
        _candidate("clipped", [{"technique": "weight_clip", "percentile": 99.9}], "eager", "fp32"),
    ]


@dataclass(frozen=True)
class Candidate:
    name: str
    steps: tuple[Any, ...]
    """Technique configs, applied in order."""
    realization: RealizationConfig
    ratio_search: RatioSearchSettings | None = None
    """Search the ``channel_prune`` step's ratio (each ratio tried becomes a candidate of its own)."""

    @classmethod
    def from_settings(cls, settings: CandidateSettings) -> Candidate:
        return cls(
            settings.name,
            tuple(config_from_dict(step) for step in settings.steps),
            RealizationConfig.from_dict(settings.realization),
            settings.ratio_search,
        )

    def at_ratio(self, ratio: float, like: Candidate | None) -> Candidate:
        """The variant of this ratio search pruned at ``ratio``; realized like ``like`` (adding its steps) when
        given, else as configured. Named ``<name>-r<percent>[-<like's name>]``."""
        steps = tuple(
            dataclasses.replace(step, ratio=ratio) if step.name == "channel_prune" else step for step in self.steps
        )
        name = f"{self.name}-r{round(ratio * 100):02d}"
        if like is None:
            return Candidate(name, steps, self.realization)
        extra = tuple(step for step in like.steps if step not in steps)
        return Candidate(f"{name}-{like.name}", steps + extra, like.realization)

    @property
    def techniques(self) -> list[str]:
        """Human-readable chain, e.g. ``["channel_prune", "onnxruntime:int8"]``."""
        return [step.name for step in self.steps] + [f"{self.realization.runtime}:{self.realization.precision}"]
