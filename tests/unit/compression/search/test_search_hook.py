"""``run_search``'s ``on_candidate_built`` hook: each built candidate's predictor, before it is measured."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compression.runtimes.predictor import Predictor
from compression.search.accuracy import fidelity, predict_top1
from compression.search.runner import run_search
from compression.search.settings import (
    BudgetSettings,
    CandidateSettings,
    CompressionSettings,
    MeasurementSettings,
    TargetSettings,
)
from tests.models import random_eval_data

BATCH = 4
EAGER = {"runtime": "eager", "precision": "fp32"}


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()


def test_the_hook_sees_every_built_candidate_before_the_measurement(tmp_path: Path) -> None:
    model = tiny_model()
    data = random_eval_data()
    settings = CompressionSettings(
        target=TargetSettings(device="cpu", batch_size=1),
        budget=BudgetSettings(max_accuracy_drop=100.0),
        candidates=[
            CandidateSettings(name="eager-fp32", realization=EAGER),
            CandidateSettings(name="folded-eager-fp32", steps=[{"technique": "bn_fold"}], realization=EAGER),
            # fails to build: CUDA graphs on a CPU target
            CandidateSettings(name="broken", realization={**EAGER, "cuda_graphs": True}),
        ],
        measurement=MeasurementSettings(warmup=1, iterations=10),
    )
    events: list[str] = []
    seen: dict[str, Predictor] = {}

    def on_candidate_built(name: str, predictor: Predictor) -> None:
        events.append(f"built {name}")
        seen[name] = predictor

    report = run_search(
        model,
        settings,
        data,
        tmp_path,
        model_name="tiny",
        max_batch_size=BATCH,
        progress=events.append,
        on_candidate_built=on_candidate_built,
    )

    assert list(seen) == ["eager-fp32", "folded-eager-fp32"]  # in order; not the original, not the failure
    assert report.variant("broken").error is not None
    measuring = next(i for i, e in enumerate(events) if e.startswith("measuring latency"))
    assert events.index("built folded-eager-fp32") < measuring
    reference = predict_top1(model, data.validation, BATCH)
    x = data.validation[:BATCH]
    for name, predictor in seen.items():
        # still usable after the search, which deleted the artifacts it did not choose
        torch.testing.assert_close(predictor(x), model(x).detach(), rtol=1e-4, atol=1e-5)
        measured = fidelity(predict_top1(predictor, data.validation, BATCH), reference, data.validation_labels)
        variant = report.variant(name)
        assert variant.latency_p50_ms is not None
        assert (variant.top1, variant.agreement) == (measured.top1, measured.agreement)
