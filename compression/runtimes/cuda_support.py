"""Small CUDA helpers shared by the search, the runtimes, the server and the benchmarks.

Everything here imports and runs on a CPU-only machine: nothing touches a GPU unless a ``cuda``
device is asked for.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

TENSOR_CORE_CAPABILITY = (7, 0)
"""From Volta on, cuDNN's tensor-core convolutions read NHWC natively (NCHW costs transposes)."""


class CudaUnavailable(RuntimeError):
    """A ``cuda`` device was asked for where torch sees none."""


def require_cuda(device: torch.device | str) -> torch.device:
    """``device`` as a torch.device; raises CudaUnavailable with a clear message if it is CUDA and absent."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise CudaUnavailable(
            f"device {device} was asked for, but torch {torch.__version__} sees no CUDA device "
            "(no GPU, no driver, or a CPU-only torch build)"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise CudaUnavailable(f"device {device} was asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    return torch.device("cuda", index)


def module_device(module: nn.Module) -> torch.device:
    """Where ``module``'s first parameter (or buffer) lives; the CPU for a module without tensors."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def prefers_channels_last(module: nn.Module, device: torch.device) -> bool:
    """True for a CNN on a GPU with tensor cores, where NHWC is the convolutions' native layout."""
    if device.type != "cuda" or not any(isinstance(m, nn.Conv2d) for m in module.modules()):
        return False
    return torch.cuda.get_device_capability(device) >= TENSOR_CORE_CAPABILITY


@contextmanager
def exact_fp32() -> Iterator[None]:
    """Full-precision fp32 convolutions and matmuls (no TF32) for the duration.

    NOTE: cuDNN convolutions run in TF32 by default on Ampere and later (10-bit mantissa); a check that
    compares two float32 models (BN folding) would see TF32 rounding, not a real difference. Uses the
    fp32_precision API only and restores the exact previous values, so legacy ``allow_tf32`` readers
    see a consistent state afterwards.
    """
    # NOTE: torch's stub of backends.cudnn omits ``conv``, which CudnnModule provides at runtime.
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul  # type: ignore[attr-defined]
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved
