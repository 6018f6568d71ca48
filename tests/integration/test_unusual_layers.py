"""A model with depthwise and transposed convolutions goes through the whole search and is served."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton

from compression.models.loading import load_model
from compression.search.pipeline import compress
from server.config.settings import DeployConfig
from tests.models import OddNet, calibrated
from tests.serving import running_server

pytestmark = pytest.mark.slow

EVERY_TECHNIQUE = [
    {
        "name": "bn-fold-onnxruntime",
        "steps": [{"technique": "bn_fold"}],
        "realization": {"runtime": "onnxruntime", "precision": "fp32"},
    },
    {"name": "int8-onnxruntime", "realization": {"runtime": "onnxruntime", "precision": "int8"}},
    {"name": "int8-compiled", "realization": {"runtime": "inductor", "precision": "int8"}},
    {
        "name": "pruned",
        "steps": [{"technique": "channel_prune", "ratio": 0.5, "distillation": {"epochs": 1}}],
        "realization": {"runtime": "eager", "precision": "fp32"},
    },
    {
        "name": "student",
        "steps": [{"technique": "student", "architecture": "depthwise_separable", "distillation": {"epochs": 1}}],
        "realization": {"runtime": "onnxruntime", "precision": "fp32"},
    },
    {
        "name": "sparse",
        "steps": [{"technique": "magnitude_prune", "sparsity": 0.5}],
        "realization": {"runtime": "eager", "precision": "fp32"},
    },
    {
        "name": "clustered",
        "steps": [{"technique": "weight_cluster", "bits": 4}],
        "realization": {"runtime": "eager", "precision": "fp32"},
    },
    {
        "name": "clipped",
        "steps": [{"technique": "weight_clip", "percentile": 99.0}],
        "realization": {"runtime": "eager", "precision": "bf16"},
    },
]


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> DeployConfig:
    root = tmp_path_factory.mktemp("oddnet")
    torch.manual_seed(0)
    images = torch.randn(300, 3, 32, 32)
    torch.save(calibrated(OddNet(), images).state_dict(), root / "oddnet.pt")
    torch.save({"images": images}, root / "data.pt")  # no labels: fidelity is agreement
    return DeployConfig.model_validate(
        {
            "cache_dir": str(root / "cache"),
            "models": [
                {
                    "name": "oddnet",
                    "source": {
                        "format": "python",
                        "factory": "tests.models:OddNet",
                        "weights": str(root / "oddnet.pt"),
                    },
                    "labels": ["a", "b", "c", "d", "e"],
                    "preprocessing": {"channels": 3, "resize": 32, "crop": 32},
                    "batching": {"max_batch_size": 8},
                    "compression": {
                        "budget": {"max_accuracy_drop": None, "min_agreement": 0.5},
                        "data": {
                            "source": "tensor_file",
                            "path": str(root / "data.pt"),
                            "calibration_size": 200,
                            "validation_size": 100,
                        },
                        "measurement": {"warmup": 3, "iterations": 15},
                        "candidates": EVERY_TECHNIQUE,
                        # NOTE: every technique must run here, the student too, though 200 images are far too few
                        # for a useful one (the default skips it below 2000)
                        "search": {"student_min_images": 100},
                    },
                }
            ],
        }
    )


def test_every_technique_works_or_says_why_and_the_result_is_served(config: DeployConfig) -> None:
    settings = config.models[0]
    entry = compress(settings, load_model(settings, config.resolved_cache_dir()), config.resolved_cache_dir())
    report = entry.report
    assert report.data["labelled"] is False
    by_name = {c.name: c for c in report.candidates}
    assert set(by_name) == {c["name"] for c in EVERY_TECHNIQUE}
    for candidate in report.candidates:
        if candidate.error is None:
            assert candidate.latency_p95_ms and candidate.agreement is not None and candidate.macs
        else:
            assert len(candidate.error) > 10  # a reason, not just a type
    working = [c.name for c in report.candidates if c.error is None]
    assert {"bn-fold-onnxruntime", "int8-onnxruntime", "pruned", "student", "sparse"} <= set(working), {
        c.name: c.error for c in report.candidates
    }
    assert by_name["pruned"].macs < report.original.macs

    with running_server(config) as server:
        client = triton.InferenceServerClient(server.address)
        model = server.server.registry.get("oddnet")
        assert model.default_variant == report.chosen
        x = triton.InferInput("input", [2, 3, 32, 32], "FP32")
        x.set_data_from_numpy(np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32))
        result = client.infer("oddnet", [x])
        assert result.as_numpy("logits").shape == (2, 5)
        assert result.get_response().model_version == report.chosen
