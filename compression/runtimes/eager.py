"""Eager runtime: a ``torch.export`` program run op by op by PyTorch.

The artifact is ``torch.export.save`` output, never a pickled module, so loading needs no Python
class (a pruned model with changed shapes reloads as it was exported) and runs no arbitrary code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from compression.runtimes.common import export_program, float_model
from compression.runtimes.cuda_graphs import GraphedForward
from compression.runtimes.cuda_support import prefers_channels_last
from compression.runtimes.manifest import Manifest, check_compatible
from compression.runtimes.predictor import InputStager, check_batch

log = logging.getLogger("slimserve.compression.realization")

MODEL_FILE = "model.pt2"


class EagerPredictor:
    """Runs a module eagerly; also wraps in-memory modules (the fp32 reference, PT2E int8 previews).

    ``module`` is used as it is: moved to ``device`` (and to channels_last) in place, like
    ``nn.Module.to``; pass a copy if the caller still needs it where it was. With ``cuda_graphs`` (CUDA
    only) every batch bucket is captured now and replayed per call (``compression/runtimes/cuda_graphs.py``).
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        precision: str,
        device: torch.device,
        input_shape: tuple[int, ...],
        max_batch_size: int,
        channels_last: bool = False,
        runtime: str = "eager",
        cuda_graphs: bool = False,
    ) -> None:
        self.runtime = runtime
        self.precision = precision
        self.device = device
        self.max_batch_size = max_batch_size
        self.input_shape = tuple(input_shape)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        module = module.to(device)
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        self._module: Callable[[torch.Tensor], torch.Tensor] = module
        self._stager = InputStager(device, self.input_shape, max_batch_size, memory_format)
        if cuda_graphs:
            self._module = GraphedForward(module, device, self.input_shape, max_batch_size, memory_format)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        check_batch(batch, self.input_shape, self.max_batch_size)
        with torch.inference_mode():
            out = self._module(self._stager.stage(batch))
            # NOTE: .cpu() synchronizes on CUDA, so the pinned input buffer is free when we return.
            return out.to(torch.float32).cpu()


INT8_BUILDER = None
"""No int8: eager int8 would only simulate quantization in float."""


def save_float(
    model: nn.Module,
    precision: str,
    device: torch.device,
    example: torch.Tensor,
    max_batch_size: int,
    artifact_dir: Path,
) -> list[str]:
    """Export ``model`` at ``precision`` on ``device`` with a dynamic batch; returns the files written."""
    program = export_program(float_model(model, precision, device), example.to(device), max_batch_size)
    torch.export.save(program, artifact_dir / MODEL_FILE)
    return [MODEL_FILE]


def load(artifact_dir: Path, manifest: Manifest, device: torch.device) -> EagerPredictor:
    check_compatible(manifest, device, compiled=False)
    program = torch.export.load(artifact_dir / MODEL_FILE)
    return EagerPredictor(
        program.module(),
        precision=manifest.precision,
        device=device,
        input_shape=tuple(manifest.input_shape),
        max_batch_size=manifest.max_batch_size,
        channels_last=bool(manifest.config.get("channels_last", False)),
        cuda_graphs=bool(manifest.config.get("cuda_graphs", False)),
    )


def reference_predictor(
    module: nn.Module, device: torch.device, input_shape: tuple[int, ...], max_batch_size: int
) -> EagerPredictor:
    """The original model as served and as the search times it: fp32 eager, NHWC on tensor-core GPUs.

    ``module`` is moved to ``device`` in place (see EagerPredictor).
    """
    return EagerPredictor(
        module.eval(),
        precision="fp32",
        device=device,
        input_shape=input_shape,
        max_batch_size=max_batch_size,
        channels_last=prefers_channels_last(module, device),
    )
