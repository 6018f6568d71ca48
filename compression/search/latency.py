"""Latency of predictors, timed side by side so they share the machine's noise.

On a shared machine a run can be 10-15% off from one minute to the next; timing candidates one
after another would attribute that drift to whichever ran during it. Here every round calls each
predictor once, and the order rotates from round to round so none is always first after another's
cache or thread effects.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from compression.runtimes.predictor import Predictor


@dataclass(frozen=True)
class LatencyStats:
    p50_ms: float
    p95_ms: float
    mean_ms: float
    samples: tuple[float, ...]
    """Every timed call in milliseconds, in the order they ran."""

    @classmethod
    def from_samples(cls, samples: list[float]) -> LatencyStats:
        if not samples:
            raise ValueError("no latency samples")
        return cls(
            p50_ms=_percentile(samples, 50),
            p95_ms=_percentile(samples, 95),
            mean_ms=statistics.fmean(samples),
            samples=tuple(samples),
        )


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default method)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _timer(predictor: Predictor) -> Callable[[torch.Tensor], float]:
    """A function that calls ``predictor`` once and returns the elapsed milliseconds."""
    device = torch.device(predictor.device)
    if device.type == "cuda":

        def time_cuda(example: torch.Tensor) -> float:
            # NOTE: events on the predictor's device and stream; the predictor returns CPU outputs (a
            # synchronizing copy), so the span covers staging, the forward pass and the copy back.
            with torch.cuda.device(device):
                torch.cuda.synchronize(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                predictor(example)
                end.record()
                end.synchronize()
                return float(start.elapsed_time(end))

        return time_cuda

    def time_cpu(example: torch.Tensor) -> float:
        begin = time.perf_counter()
        predictor(example)
        return (time.perf_counter() - begin) * 1000.0

    return time_cpu


def measure_latency(
    predictors: dict[str, Predictor], example: torch.Tensor, *, warmup: int, iterations: int
) -> dict[str, LatencyStats]:
    """Per-call latency of each predictor on ``example`` (float32 (B, C, H, W) on the CPU).

    Each predictor is first called ``warmup`` times (also round-robin), then ``iterations`` rounds
    call every predictor once. Timings include the predictor's host/device copies, since the server
    pays them too.
    """
    if not predictors:
        raise ValueError("no predictors to measure")
    if warmup < 0 or iterations < 1:
        raise ValueError(f"need warmup >= 0 and iterations >= 1, got {warmup} and {iterations}")
    names = list(predictors)
    timers = {name: _timer(predictors[name]) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(warmup):
        for name in names:
            predictors[name](example)
    gc.collect()
    # NOTE: a collection pause inside one timed call would land on whichever predictor ran then.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_index in range(iterations):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(timers[name](example))
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: LatencyStats.from_samples(samples[name]) for name in names}
