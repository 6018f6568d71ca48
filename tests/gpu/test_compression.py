"""The compression search on a GPU: fp16, bf16, CUDA-graphed and compiled candidates, measured with CUDA
events at the budget's batch size; the chosen chain keeps >= 99% top-1 agreement and is served from the GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton

from compression.models.digits.data import load_splits, normalize
from compression.models.loading import load_model
from compression.runtimes.realization import load_predictor
from compression.search.accuracy import predict_top1
from compression.search.candidates import default_candidates
from compression.search.pipeline import CompressedEntry, compress
from server.config.settings import DeployConfig
from tests.gpu.conftest import digits_on
from tests.serving import running_server

CANDIDATES = ("fp16", "bf16", "fp16-cudagraphs", "compiled-fp16", "compiled-bf16")
BATCH = 64
COMPRESSION = {
    "target": {"device": "cuda", "batch_size": BATCH},
    "budget": {"min_agreement": 0.99, "max_accuracy_drop": None},
    "data": {"calibration_size": 256, "validation_size": 500},
    "measurement": {"warmup": 5, "iterations": 30},
    "candidates": [c.model_dump() for c in default_candidates("cuda") if c.name in CANDIDATES],
}


@pytest.fixture(scope="module")
def config(gpu_cache: Path) -> DeployConfig:
    return digits_on("cuda", gpu_cache, compression=COMPRESSION)


@pytest.fixture(scope="module")
def entry(config: DeployConfig) -> CompressedEntry:
    settings = config.models[0]
    return compress(settings, load_model(settings, config.resolved_cache_dir()), config.resolved_cache_dir())


def test_every_gpu_candidate_is_built_and_measured(entry: CompressedEntry) -> None:
    report = entry.report
    assert report.device.startswith("cuda") and report.batch_size == BATCH
    assert sorted(c.name for c in report.candidates) == sorted(CANDIDATES)
    errors = {c.name: c.error for c in report.candidates if c.error}
    assert not errors, errors
    for variant in [report.original, *report.candidates]:
        assert variant.latency_p50_ms is not None and variant.latency_p95_ms is not None, variant.name
        assert 0 < variant.latency_p50_ms <= variant.latency_p95_ms, variant.name
        assert variant.agreement is not None, variant.name


def test_the_chosen_chain_keeps_agreement(entry: CompressedEntry) -> None:
    report = entry.report
    chosen = report.variant(report.chosen)
    latencies = {v.name: v.latency_p95_ms for v in [report.original, *report.candidates]}
    assert report.chosen != "original", f"{report.reason}; p95 ms at batch {BATCH}: {latencies}"
    assert report.budget_met and chosen.meets_budget
    assert chosen.agreement is not None and chosen.agreement >= 0.99
    assert chosen.techniques[0] == "bn_fold", "BN is folded before casting to half precision"


def test_the_chosen_artifact_reloads_on_the_gpu(entry: CompressedEntry, config: DeployConfig) -> None:
    assert entry.chosen_artifact is not None
    predictor = load_predictor(entry.chosen_artifact, "cuda")
    assert predictor.device.type == "cuda"
    images = torch.from_numpy(normalize(load_splits()["test"].images))
    original = load_model(config.models[0], config.resolved_cache_dir()).module.eval()
    agreement = (predict_top1(predictor, images, BATCH) == predict_top1(original, images, BATCH)).mean()
    assert agreement >= 0.99


def test_the_server_serves_the_compressed_variant_from_the_gpu(entry: CompressedEntry, config: DeployConfig) -> None:
    """The search result is in the cache, so the server loads it at start and makes it the default."""
    images = normalize(load_splits()["test"].images[:32])
    with running_server(config) as server:
        client = triton.InferenceServerClient(server.address)
        answers = {}
        for version in ("", "original"):
            tensor = triton.InferInput("input", list(images.shape), "FP32")
            tensor.set_data_from_numpy(images)
            result = client.infer("digits", [tensor], model_version=version)
            answers[result.get_response().model_version] = result.as_numpy("logits").argmax(1)
    assert set(answers) == {entry.report.chosen, "original"}
    assert np.mean(answers[entry.report.chosen] == answers["original"]) >= 0.95
