"""Sensitivity-guided int8 fallback: keep the layers that quantize worst in float.

When the fully quantized model loses more score than allowed, each quantizable layer is quantized
on its own (every other layer in float) and the score it alone loses is its sensitivity; layers are
then returned to float in order of sensitivity until the drop is within budget or the layer limit is
reached. One-at-a-time rather than leave-one-out, because a quantized activation is shared by the
layers on both sides of it (ONNX Runtime quantizes a Conv's output too): leaving out one of them
recovers nothing, quantizing either one alone shows the loss. Ties in score (common on small
validation slices) are broken by the output SQNR against the float model, which is continuous.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from compression.runtimes.predictor import Predictor

ScoreFn = Callable[[Predictor], float]


class Int8Builder(Protocol):
    """One runtime's int8 pipeline, prepared once (export, calibration) and reused for every variant."""

    def layers(self) -> list[str]:
        """Names of the layers that can stay in float, in model order."""
        ...

    quantization: dict[str, Any]
    """How it quantizes (for the manifest)."""

    def variant(self, float_layers: Sequence[str]) -> Predictor:
        """A quickly built in-memory predictor quantized except for ``float_layers``."""
        ...

    def save(self, float_layers: Sequence[str], artifact_dir: Path) -> list[str]:
        """Write the artifact quantized except for ``float_layers``; returns the file names."""
        ...


@dataclass
class FallbackResult:
    float_layers: list[str]
    reference_score: float
    """Score of the float32 model."""
    int8_score: float
    """Score with every layer quantized."""
    preview_score: float
    """Score of the preview variant with ``float_layers`` in float (the served artifact is scored later)."""
    max_score_drop: float
    sensitivity: dict[str, float] = field(default_factory=dict)
    """Score lost with only this layer quantized (measured only when the full int8 is over budget)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference_score": self.reference_score,
            "int8_score": self.int8_score,
            "preview_score": self.preview_score,
            "max_score_drop": self.max_score_drop,
            "sensitivity": self.sensitivity,
        }


def choose_float_layers(
    builder: Int8Builder,
    *,
    score_fn: ScoreFn,
    tie_break: ScoreFn,
    reference_score: float,
    max_score_drop: float,
    max_layers: int,
    progress: Callable[[str], None],
) -> FallbackResult:
    """Greedily pick the most sensitive layers to keep in float (see the module docstring)."""
    full_score = score_fn(builder.variant([]))
    result = FallbackResult([], reference_score, full_score, full_score, max_score_drop)
    progress(f"int8 fallback: float score {reference_score:.4f}, int8 score {full_score:.4f}")
    if reference_score - full_score <= max_score_drop or max_layers == 0:
        return result

    layers = builder.layers()
    ranking: dict[str, tuple[float, float]] = {}
    for index, layer in enumerate(layers, 1):
        preview = builder.variant([other for other in layers if other != layer])
        # NOTE: sorted descending: a larger score drop first, then a lower SQNR first.
        ranking[layer] = (reference_score - score_fn(preview), -tie_break(preview))
        progress(f"int8 fallback: {index}/{len(layers)} only {layer} in int8: score drop {ranking[layer][0]:.4f}")
    result.sensitivity = {layer: drop for layer, (drop, _) in ranking.items()}
    order = sorted(layers, key=lambda name: ranking[name], reverse=True)

    for layer in order[:max_layers]:
        result.float_layers.append(layer)
        result.preview_score = score_fn(builder.variant(result.float_layers))
        progress(f"int8 fallback: {len(result.float_layers)} layer(s) in float, score {result.preview_score:.4f}")
        if reference_score - result.preview_score <= max_score_drop:
            break
    return result
