"""CUDA-event latency: it tracks the work done, agrees with the wall clock, and covers the copy back."""

from __future__ import annotations

import time

import numpy as np
import torch

from compression.search.latency import measure_latency


class BusyPredictor:
    """``repeats`` 2048x2048 matmuls on the GPU per call, then a synchronizing copy to the CPU, as predictors do."""

    runtime = "test"
    precision = "fp32"
    max_batch_size = 64

    def __init__(self, repeats: int) -> None:
        self.device = torch.device("cuda")
        self.repeats = repeats
        self._weight = torch.randn(2048, 2048, device=self.device) / 45

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = self._weight
        for _ in range(self.repeats):
            x = torch.tanh(x @ self._weight)
        return x[: batch.shape[0], :10].cpu()


def wall_ms(predictor: BusyPredictor, example: torch.Tensor, calls: int = 30) -> float:
    samples = []
    for _ in range(calls):
        torch.cuda.synchronize()
        started = time.perf_counter()
        predictor(example)
        samples.append((time.perf_counter() - started) * 1000)
    return float(np.median(samples))


def test_cuda_event_latency_tracks_the_work_and_the_wall_clock() -> None:
    example = torch.zeros(8, 3, 4, 4)
    light, heavy = BusyPredictor(4), BusyPredictor(8)
    stats = measure_latency({"light": light, "heavy": heavy}, example, warmup=5, iterations=30)
    for name in ("light", "heavy"):
        assert len(stats[name].samples) == 30
        assert 0 < stats[name].p50_ms <= stats[name].p95_ms
    ratio = stats["heavy"].p50_ms / stats["light"].p50_ms
    assert 1.5 <= ratio <= 2.5, f"twice the work took {ratio:.2f}x the time"
    wall = wall_ms(heavy, example)
    assert abs(stats["heavy"].p50_ms - wall) <= 0.25 * wall + 0.2, (stats["heavy"].p50_ms, wall)
