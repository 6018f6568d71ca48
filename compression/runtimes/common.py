"""Pieces every runtime shares: the cast wrapper, export with a dynamic batch, calibration batches."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from compression.runtimes.predictor import FLOAT_DTYPES

BATCH_DIM_NAME = "batch"


class CastIO(nn.Module):
    """Runs ``model`` in ``dtype``: casts the float32 input in and the output back to float32.

    The casts are part of the exported graph, so the artifact alone says how to call it.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).to(torch.float32)


def float_model(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """A copy of ``model`` on ``device`` that takes and returns float32, computing in ``precision``."""
    if precision not in FLOAT_DTYPES:
        raise ValueError(f"{precision!r} is not a float precision ({', '.join(FLOAT_DTYPES)})")
    dtype = FLOAT_DTYPES[precision]
    copied = copy.deepcopy(model).eval().to(device)
    if dtype == torch.float32:
        return copied
    return CastIO(copied.to(dtype), dtype).eval()


def export_example(example_inputs: torch.Tensor, max_batch_size: int) -> torch.Tensor:
    """A float32 example batch for tracing: 2 rows where the batch is dynamic, else 1.

    NOTE: export specializes a size of 1, so a dynamic batch is traced with 2 rows.
    """
    rows = 2 if max_batch_size >= 2 else 1
    first = example_inputs[:1].to(torch.float32)
    return first.expand(rows, *first.shape[1:]).contiguous()


def batch_dynamic_shapes(max_batch_size: int) -> tuple[dict[int, object], ...] | None:
    """``dynamic_shapes`` for a single input with batch 1..max_batch_size (None when it is fixed at 1)."""
    if max_batch_size < 2:
        return None
    return ({0: torch.export.Dim(BATCH_DIM_NAME, min=1, max=max_batch_size)},)


def export_program(
    model: nn.Module, example: torch.Tensor, max_batch_size: int, *, strict: bool = False
) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch dimension (1..max_batch_size).

    Non-strict export is enough for eager, AOTInductor and ONNX; PT2E quantization needs
    ``strict=True`` on resnets (blocks that reuse one ReLU module fail to annotate otherwise).
    """
    return torch.export.export(model, (example,), dynamic_shapes=batch_dynamic_shapes(max_batch_size), strict=strict)


def calibration_chunks(calibration_inputs: torch.Tensor, rows: int, chunk: int) -> Iterator[torch.Tensor]:
    """The first ``rows`` calibration inputs as float32 batches of at most ``chunk`` rows."""
    if calibration_inputs.shape[0] == 0:
        raise ValueError("int8 calibration needs calibration inputs, got none")
    total = min(calibration_inputs.shape[0], rows)
    for start in range(0, total, chunk):
        yield calibration_inputs[start : min(start + chunk, total)].to(torch.float32).contiguous()


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``approx`` against ``reference``, in dB."""
    noise = (reference.float() - approx.float()).norm()
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(reference.float().norm() / noise))


@contextlib.contextmanager
def inductor_cache_dir(directory: Path | None) -> Iterator[None]:
    """Keep TorchInductor's compile caches under ``directory`` for the duration (no-op for None).

    Every build runs inside it: a runtime that compiles (``inductor``) finds its caches there."""
    if directory is None:
        yield
        return
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    directory.mkdir(parents=True, exist_ok=True)
    # NOTE: absolute, because the AOTInductor CUDA wrapper's g++ call does not run in this directory.
    with temporary_cache_dir(str(directory.resolve())):
        yield
