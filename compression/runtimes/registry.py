"""The runtimes by name: adding one is one module implementing :class:`RuntimeModule` and one line in
:data:`RUNTIMES`. Modules are imported on first use (onnx/onnxruntime and torchao are slow to import,
and a server loads one runtime per variant)."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, cast

import torch
from torch import nn

from compression.runtimes.manifest import Manifest
from compression.runtimes.predictor import PRECISIONS, Predictor


class Int8BuilderType(Protocol):
    """The constructor of a runtime's int8 builder (see ``int8_fallback.Int8Builder``)."""

    def __call__(
        self, model: nn.Module, example: torch.Tensor, calibration: Iterable[torch.Tensor], max_batch_size: int
    ) -> object: ...


class RuntimeModule(Protocol):
    """What a runtime module provides to ``realization``."""

    INT8_BUILDER: Int8BuilderType | None
    """Builds int8 variants (with per-layer float fallback); None where the runtime has no int8."""

    def save_float(
        self,
        model: nn.Module,
        precision: str,
        device: torch.device,
        example: torch.Tensor,
        max_batch_size: int,
        artifact_dir: Path,
    ) -> list[str]:
        """Write the float artifact's files into ``artifact_dir``; returns their names."""
        ...

    def load(self, artifact_dir: Path, manifest: Manifest, device: torch.device) -> Predictor:
        """Load a written artifact as a predictor."""
        ...

    def build_scope(self, cache_dir: Path | None) -> AbstractContextManager[None]:
        """Where builds keep their compile caches (a no-op for runtimes that compile nothing)."""
        ...


@dataclass(frozen=True)
class RuntimeEntry:
    module: str
    """Dotted name of the module implementing :class:`RuntimeModule`."""
    precisions: tuple[str, ...]
    """Precisions the runtime realizes, a subset of ``predictor.PRECISIONS``."""
    unsupported: dict[str, str] = field(default_factory=dict)
    """Why a precision is not offered, where there is more to say than "not implemented"."""

    def implementation(self) -> RuntimeModule:
        return cast(RuntimeModule, importlib.import_module(self.module))


RUNTIMES: dict[str, RuntimeEntry] = {
    "eager": RuntimeEntry(
        "compression.runtimes.eager",
        ("fp32", "fp16", "bf16"),
        {
            "int8": "eager int8 only simulates quantization in float (slower than fp32); "
            "use runtime 'inductor' (PT2E) or 'onnxruntime' (QDQ)"
        },
    ),
    "inductor": RuntimeEntry("compression.runtimes.inductor", ("fp32", "int8", "fp16", "bf16")),
    "onnxruntime": RuntimeEntry(
        "compression.runtimes.onnx_runtime",
        ("fp32", "int8", "fp16"),
        {"bf16": "ONNX Runtime's CPU provider has no bf16 kernels; use fp16, or bf16 on 'eager' or 'inductor'"},
    ),
}
"""Every runtime by the name deploy configs and manifests use."""

assert all(set(entry.precisions) <= set(PRECISIONS) for entry in RUNTIMES.values())


def runtime_entry(name: str) -> RuntimeEntry:
    """The entry for ``name``; raises ValueError naming the known runtimes."""
    try:
        return RUNTIMES[name]
    except KeyError:
        raise ValueError(f"unknown runtime {name!r} (known: {', '.join(RUNTIMES)})") from None


def check_supported(name: str, precision: str) -> None:
    """Raise ValueError unless runtime ``name`` realizes ``precision``, saying why not."""
    entry = runtime_entry(name)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
    if precision not in entry.precisions:
        why = entry.unsupported.get(precision, "not implemented")
        raise ValueError(f"runtime {name!r} does not support {precision}: {why}")
