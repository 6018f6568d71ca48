"""``run_search``'s spans: the search, a span per candidate (the original too) with build, latency and fidelity."""

from __future__ import annotations

from pathlib import Path

import torch
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from torch import nn

from compression.search.runner import run_search
from compression.search.settings import (
    BudgetSettings,
    CandidateSettings,
    CompressionSettings,
    MeasurementSettings,
    TargetSettings,
)
from tests.models import random_eval_data

EAGER = {"runtime": "eager", "precision": "fp32"}


def test_a_span_per_candidate_with_build_latency_and_fidelity(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3)).eval()
    data = random_eval_data()
    settings = CompressionSettings(
        target=TargetSettings(device="cpu", batch_size=1),
        budget=BudgetSettings(max_accuracy_drop=100.0),
        candidates=[
            CandidateSettings(name="eager-fp32", realization=EAGER),
            CandidateSettings(name="broken", realization={**EAGER, "cuda_graphs": True}),  # CUDA graphs on a CPU
        ],
        measurement=MeasurementSettings(warmup=1, iterations=10),
    )
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    report = run_search(
        model,
        settings,
        data,
        tmp_path,
        model_name="tiny",
        max_batch_size=4,
        progress=lambda line: None,
        tracer=provider.get_tracer("test"),
    )

    spans = exporter.get_finished_spans()
    by_id = {span.context.span_id: span for span in spans if span.context is not None}

    def children(name: str) -> dict[str, object]:
        parent = next(s for s in spans if s.name == name)
        assert parent.context is not None
        return {s.name: s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id}

    (search,) = [s for s in spans if s.name == "compression.search"]
    assert search.parent is None and search.attributes is not None
    assert search.attributes["slimserve.model"] == "tiny" and search.attributes["slimserve.chosen"] == report.chosen
    assert set(children("compression.search")) == {"candidate original", "candidate eager-fp32", "candidate broken"}
    assert set(children("candidate eager-fp32")) == {"build", "latency", "fidelity"}
    assert set(children("candidate original")) == {"latency", "fidelity"}
    assert set(children("candidate broken")) == {"build"}
    broken = next(s for s in spans if s.name == "candidate broken")
    assert broken.status.status_code is StatusCode.ERROR
    eager = next(s for s in spans if s.name == "candidate eager-fp32")
    assert eager.attributes is not None
    assert eager.attributes["slimserve.latency_p95_ms"] == report.variant("eager-fp32").latency_p95_ms
    assert eager.attributes["slimserve.agreement"] == report.variant("eager-fp32").agreement
    assert eager.attributes["slimserve.chosen"] == (report.chosen == "eager-fp32")
    latencies = [s for s in spans if s.name == "latency"]
    assert len({(s.start_time, s.end_time) for s in latencies}) == 1  # one interleaved measurement
    assert all(s.parent is not None and s.parent.span_id in by_id for s in spans if s is not search)
