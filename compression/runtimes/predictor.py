"""What the server calls: a realized model at one precision on one runtime.

Every predictor takes a float32 (B, C, H, W) batch on the CPU, 1 <= B <= ``max_batch_size``, and
returns float32 logits on the CPU, whatever its precision, runtime or device; casting and device
copies happen inside. Calls are thread-safe; the server calls each predictor from one worker thread.
"""

from __future__ import annotations

import threading
from typing import Protocol, runtime_checkable

import torch

PRECISIONS: tuple[str, ...] = ("fp32", "int8", "fp16", "bf16")
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


@runtime_checkable
class Predictor(Protocol):
    runtime: str
    """A name in ``compression.runtimes.registry.RUNTIMES``."""
    precision: str
    """One of :data:`PRECISIONS`."""
    device: torch.device
    """Where the model runs; inputs and outputs stay on the CPU."""
    max_batch_size: int

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """float32 (B, C, H, W) on the CPU -> float32 (B, classes) logits on the CPU."""
        ...


def check_batch(batch: torch.Tensor, input_shape: tuple[int, ...], max_batch_size: int) -> None:
    """Raise ValueError unless ``batch`` is what every predictor accepts."""
    if not isinstance(batch, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(batch).__name__}")
    if batch.dtype != torch.float32 or batch.device.type != "cpu":
        raise ValueError(f"expected a float32 CPU tensor, got {batch.dtype} on {batch.device}")
    if batch.dim() != len(input_shape) + 1 or tuple(batch.shape[1:]) != tuple(input_shape):
        raise ValueError(f"expected shape (B, {', '.join(map(str, input_shape))}), got {tuple(batch.shape)}")
    if not 1 <= batch.shape[0] <= max_batch_size:
        raise ValueError(f"batch size {batch.shape[0]} outside 1..{max_batch_size}")


class InputStager:
    """Moves a CPU batch to the predictor's device.

    On CUDA it copies through one pinned buffer sized for the largest batch so the host-to-device
    copy can be asynchronous; an event recorded after each copy keeps the next call from overwriting
    the buffer before the copy has read it. On the CPU it only makes the batch contiguous in the
    wanted memory format.
    """

    def __init__(
        self,
        device: torch.device,
        input_shape: tuple[int, ...],
        max_batch_size: int,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        self.device = device
        self.memory_format = memory_format
        self._lock = threading.Lock()
        self._pinned: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None
        if device.type == "cuda":
            self._pinned = torch.empty((max_batch_size, *input_shape), dtype=torch.float32, pin_memory=True)

    def stage(self, batch: torch.Tensor) -> torch.Tensor:
        if self._pinned is None:
            return batch.contiguous(memory_format=self.memory_format)
        with self._lock:
            if self._copied is not None:
                self._copied.synchronize()
            staged = self._pinned[: batch.shape[0]]
            staged.copy_(batch)
            on_device = staged.to(self.device, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        return on_device.contiguous(memory_format=self.memory_format)
