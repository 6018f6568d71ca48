"""Cumulative per-variant statistics in Triton's ``ModelStatistics`` shape (what perf_analyzer reads).

Durations are nanoseconds summed over requests; updated on the event loop thread only.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from server.batching.batcher import BatchRecord


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)


@dataclass
class InferenceStats:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    """Rows inferred (a request with batch 8 counts 8)."""
    execution_count: int = 0
    """Forward passes run."""
    last_inference_ms: int = 0
    batches: dict[int, Duration] = field(default_factory=lambda: defaultdict(Duration))
    """Per batch size: forward passes of that size and their compute time."""

    def record_batch(self, record: BatchRecord) -> None:
        if not record.succeeded:
            return
        self.execution_count += 1
        self.inference_count += record.batch_size
        self.last_inference_ms = int(time.time() * 1000)
        self.batches[record.batch_size].add(record.compute_seconds)

    def record_success(self, total_s: float, queue_s: float, input_s: float, infer_s: float, output_s: float) -> None:
        self.success.add(total_s)
        self.queue.add(queue_s)
        self.compute_input.add(input_s)
        self.compute_infer.add(infer_s)
        self.compute_output.add(output_s)

    def record_failure(self, total_s: float) -> None:
        self.fail.add(total_s)
