"""CUDA graphs for a model on the GPU: one captured graph per batch-size bucket, replayed per call.

A graph replays the whole forward pass as one launch, so the per-kernel launch cost (which dominates
small batches of small CNNs) disappears. Graphs have fixed shapes: batches are padded up to the next
bucket (powers of two, and the largest batch), and only the caller's rows are read back. Rows are
independent in an eval-mode CNN, so the padding rows (whatever a previous call left there) do not
change the caller's outputs.

Every bucket is captured when the predictor is built (so a model that cannot be captured fails its
candidate at build time, with the reason) and checked against the uncaptured forward pass.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from compression.runtimes.common import sqnr_db

MIN_REPLAY_SQNR_DB = 40.0
"""A replay must match the uncaptured forward pass this closely (it runs the same kernels)."""
_WARMUP_CALLS = 3
"""Uncaptured calls before capture: cuDNN picks its algorithms and workspaces then, not inside the graph."""


def batch_buckets(max_batch_size: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, ... below ``max_batch_size``, and ``max_batch_size`` itself."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    buckets = {max_batch_size}
    size = 1
    while size < max_batch_size:
        buckets.add(size)
        size *= 2
    return sorted(buckets)


def bucket_for(rows: int, buckets: list[int]) -> int:
    """The smallest bucket that holds ``rows``."""
    for bucket in buckets:
        if bucket >= rows:
            return bucket
    raise ValueError(f"batch of {rows} rows exceeds the largest captured batch {buckets[-1]}")


class GraphedForward:
    """``forward`` captured in CUDA graphs; call it with a batch already on the device.

    Returns the float32 logits of the caller's rows on the CPU (copied out under the lock, before any
    other replay can overwrite the graphs' shared output memory).
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
        input_shape: tuple[int, ...],
        max_batch_size: int,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.buckets = batch_buckets(max_batch_size)
        # NOTE: the graphs read the module's parameters at the addresses they had at capture; holding
        # the module keeps them alive (a caller that drops its own reference would free them, and the
        # replays would read freed memory: NaN or an illegal-address fault, seen on an H100).
        self._forward = forward
        self._lock = threading.Lock()
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        with torch.cuda.device(device), torch.inference_mode():
            gen = torch.Generator().manual_seed(0)
            example = torch.randn(max_batch_size, *input_shape, generator=gen)
            self._input = example.to(device).contiguous(memory_format=memory_format)
            self._capture(forward, device)

    def _capture(self, forward: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> None:
        expected: dict[int, torch.Tensor] = {}
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for bucket in self.buckets:
                for _ in range(_WARMUP_CALLS):
                    expected[bucket] = forward(self._input[:bucket]).float().cpu()
        torch.cuda.current_stream(device).wait_stream(side)
        pool = None
        # NOTE: largest first, all in one memory pool: smaller graphs reuse the largest one's
        # intermediate memory. Safe because replays are serialized and each output is read at once.
        for bucket in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            # NOTE: thread_local: the server loads a compressed variant on one thread while another
            # keeps serving on the same GPU; only this thread's calls must be capture-safe.
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self._outputs[bucket] = forward(self._input[:bucket])
            pool = graph.pool() if pool is None else pool
            self._graphs[bucket] = graph
        for bucket in self.buckets:
            self._graphs[bucket].replay()
            agreement = sqnr_db(expected[bucket], self._outputs[bucket].float().cpu())
            if not agreement >= MIN_REPLAY_SQNR_DB:  # NOTE: also catches NaN
                raise RuntimeError(
                    f"CUDA graph replay at batch {bucket} differs from the uncaptured forward pass "
                    f"(SQNR {agreement:.1f} dB < {MIN_REPLAY_SQNR_DB:.0f}); the model is not capture-safe"
                )

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        rows = batch.shape[0]
        bucket = bucket_for(rows, self.buckets)
        with self._lock, torch.inference_mode():
            self._input[:rows].copy_(batch)
            self._graphs[bucket].replay()
            return self._outputs[bucket][:rows].to(torch.float32).cpu()
