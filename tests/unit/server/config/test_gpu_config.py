"""The GPU paths that are pure configuration or fail fast: checked on the CPU (tests/gpu runs them on a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from compression.context import CompressionContext
from compression.models.loading import LoadedModel
from compression.models.settings import GPU_BATCHING_DEFAULTS, BatchingSettings
from compression.runtimes.cuda_graphs import GraphedForward, batch_buckets, bucket_for
from compression.runtimes.cuda_support import CudaUnavailable, exact_fp32, prefers_channels_last, require_cuda
from compression.runtimes.realization import RealizationConfig, build_predictor
from compression.search.candidates import Candidate, default_candidates
from server.config.settings import ModelSettings, load_config
from server.variants.original import original_predictor

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")
BASE = {"name": "m", "source": {"format": "builtin"}}


def settings(**fields: object) -> ModelSettings:
    return ModelSettings.model_validate({**BASE, **fields})


def test_gpu_models_get_gpu_batching_defaults() -> None:
    assert settings().batching == BatchingSettings()
    for device in ("cuda", "cuda:1"):
        batching = settings(device=device).batching
        assert (batching.max_batch_size, batching.max_queue_delay_ms) == (64, 2.0)
        assert batching.max_queue_size == BatchingSettings().max_queue_size
    assert GPU_BATCHING_DEFAULTS == {"max_batch_size": 64, "max_queue_delay_ms": 2.0}


def test_fields_the_config_sets_win_over_gpu_defaults() -> None:
    batching = settings(device="cuda", batching={"max_batch_size": 8}).batching
    assert (batching.max_batch_size, batching.max_queue_delay_ms) == (8, 2.0)
    explicit = settings(device="cuda", batching=BatchingSettings(max_queue_delay_ms=0.0)).batching
    assert (explicit.max_batch_size, explicit.max_queue_delay_ms) == (64, 0.0)
    with pytest.raises(ValidationError, match="batching.max_batch_size"):
        settings(device="cuda", batching={"max_batch_size": 0})


def test_gpu_defaults_survive_a_dump_and_reload(tmp_path: Path) -> None:
    """The server hands its config to the compression child as YAML: the batching must not change."""
    path = tmp_path / "deploy.yaml"
    path.write_text("models:\n  - {name: m, source: {format: builtin}, device: cuda}\n")
    model = load_config(path).models[0]
    assert model.batching.max_batch_size == 64
    assert ModelSettings.model_validate(model.model_dump(mode="json")).batching == model.batching


def test_compression_target_must_match_the_serving_device() -> None:
    with pytest.raises(ValidationError, match="set compression.target.device to 'cuda'"):
        settings(device="cuda", compression={})
    assert settings(device="cuda", compression={"target": {"device": "cuda:0"}}).compression is not None
    with pytest.raises(ValidationError, match="served on 'cpu'"):
        settings(compression={"target": {"device": "cuda"}})


def test_default_gpu_candidates_are_realizable_and_fold_bn_first() -> None:
    candidates = [Candidate.from_settings(c) for c in default_candidates("cuda:0")]
    realizations = {c.name: c.realization for c in candidates}
    assert {"fp16", "bf16", "fp16-cudagraphs", "compiled-fp16", "compiled-bf16"} <= set(realizations)
    assert all(r.precision in ("fp16", "bf16") for r in realizations.values()), "no int8 by default on GPUs"
    assert any(r.cuda_graphs for r in realizations.values())
    for candidate in candidates:
        assert candidate.steps[-1].name == "bn_fold", candidate.name
        prune = [s for s in candidate.steps if s.name == "channel_prune"]
        assert all(s.round_to == 8 for s in prune), "pruned channels stay multiples of 8 for tensor cores"


def test_cuda_graphs_are_validated() -> None:
    assert RealizationConfig(runtime="eager", precision="fp16", cuda_graphs=True).cuda_graphs
    with pytest.raises(ValueError, match="eager runtime only"):
        RealizationConfig(runtime="inductor", precision="fp16", cuda_graphs=True)
    with pytest.raises(ValueError, match="must be a bool"):
        RealizationConfig(cuda_graphs="yes")  # type: ignore[arg-type]


def test_cuda_graphs_refuse_a_cpu_target(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()).eval()
    images = torch.randn(4, 3, 8, 8)
    ctx = CompressionContext(calibration_inputs=images, example_inputs=images[:1], teacher=model)
    config = RealizationConfig(runtime="eager", precision="fp32", cuda_graphs=True)
    with pytest.raises(ValueError, match="needs a CUDA target"):
        build_predictor(model, config, ctx, tmp_path / "a", max_batch_size=4)
    with pytest.raises(ValueError, match="need a CUDA device"):
        GraphedForward(model, torch.device("cpu"), (3, 8, 8), 4)


def test_batch_buckets_cover_every_batch_size() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_buckets(24) == [1, 2, 4, 8, 16, 24]
    buckets = batch_buckets(24)
    assert [bucket_for(rows, buckets) for rows in (1, 3, 9, 17, 24)] == [1, 4, 16, 24, 24]
    with pytest.raises(ValueError, match="exceeds"):
        bucket_for(25, buckets)


@no_cuda
def test_a_cuda_model_without_a_gpu_fails_with_the_reason() -> None:
    with pytest.raises(CudaUnavailable, match="sees no CUDA device"):
        require_cuda("cuda:0")
    loaded = LoadedModel(torch.nn.Flatten(), [], (1, 28, 28), 10, 0.0, None)
    with pytest.raises(CudaUnavailable, match="cuda"):
        original_predictor(loaded, settings(device="cuda"))


def test_cpu_helpers_leave_the_cpu_path_alone() -> None:
    assert require_cuda("cpu") == torch.device("cpu")
    assert not prefers_channels_last(torch.nn.Conv2d(3, 3, 1), torch.device("cpu"))
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    with exact_fp32():
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    assert (conv.fp32_precision, matmul.fp32_precision) == before
