"""Predictors on the GPU: CUDA graphs replay what eager computes at every batch size, every kind stages
inputs through pinned memory, the served original is NHWC, and outputs come back as CPU float32."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from compression.runtimes.cuda_support import prefers_channels_last
from compression.runtimes.eager import reference_predictor
from compression.runtimes.predictor import Predictor
from compression.runtimes.realization import load_predictor
from tests.unit.compression.runtimes.test_realization import CLASSES, MAX_BATCH, SIZE, build, make_model


def batches(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 3, SIZE, SIZE, generator=gen) for rows in (1, 3, 5, MAX_BATCH, 2)]


def assert_cpu_logits(out: torch.Tensor, rows: int) -> None:
    assert out.device.type == "cpu" and out.dtype == torch.float32 and out.shape == (rows, CLASSES)


def test_cuda_graphs_replay_eager_at_every_batch_size(tmp_path: Path) -> None:
    _, graphed, artifact = build(tmp_path, "eager", "fp16", device="cuda", channels_last=True, cuda_graphs=True)
    _, plain, _ = build(tmp_path / "plain", "eager", "fp16", device="cuda", channels_last=True)
    reloaded = load_predictor(artifact, "cuda")
    # NOTE: batch 2 after a full batch reuses a padded bucket whose other rows hold the previous data.
    for x in batches(0):
        expected = plain(x)
        for predictor in (graphed, reloaded):
            out = predictor(x)
            assert_cpu_logits(out, x.shape[0])
            torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)


def test_cuda_graphs_are_safe_from_many_threads(tmp_path: Path) -> None:
    _, graphed, _ = build(tmp_path, "eager", "fp16", device="cuda", channels_last=True, cuda_graphs=True)
    _, plain, _ = build(tmp_path / "plain", "eager", "fp16", device="cuda", channels_last=True)
    inputs = [x for seed in range(8) for x in batches(seed)]
    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(graphed, inputs))
    for x, out in zip(inputs, outputs):
        torch.testing.assert_close(out, plain(x), atol=1e-2, rtol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("runtime,options", [("eager", {"channels_last": True}), ("inductor", {})])
def test_every_gpu_predictor_stages_through_pinned_memory(tmp_path: Path, runtime: str, options: dict) -> None:
    _, predictor, _ = build(tmp_path, runtime, "fp16", device="cuda", **options)
    stager = predictor._stager  # type: ignore[attr-defined]
    assert stager._pinned is not None and stager._pinned.is_pinned()
    assert_concurrent_calls_agree(predictor)


def test_onnxruntime_on_the_gpu_uses_io_binding(tmp_path: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDAExecutionProvider (onnxruntime-gpu is not a dependency)")
    _, predictor, _ = build(tmp_path, "onnxruntime", "fp16", device="cuda")
    assert predictor._stager is not None  # type: ignore[attr-defined]
    assert_concurrent_calls_agree(predictor)


def test_the_served_original_runs_nhwc_on_tensor_core_gpus() -> None:
    model = make_model(3)
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.inference_mode():
        expected = model(x)  # NOTE: on the CPU, before the predictor moves the model to the GPU
    predictor = reference_predictor(model, torch.device("cuda"), (3, SIZE, SIZE), MAX_BATCH)
    nhwc = prefers_channels_last(model, torch.device("cuda"))
    assert nhwc == (torch.cuda.get_device_capability() >= (7, 0))
    conv = model.stem[0]
    assert conv.weight.device.type == "cuda"
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == nhwc
    out = predictor(x)
    assert_cpu_logits(out, 4)
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)  # NOTE: TF32 convolutions


def assert_concurrent_calls_agree(predictor: Predictor) -> None:
    """Outputs from 4 threads at once equal the same calls made one by one."""
    inputs = batches(1)
    sequential = [predictor(x) for x in inputs]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(predictor, inputs))
    for x, one, many in zip(inputs, sequential, concurrent):
        assert_cpu_logits(many, x.shape[0])
        torch.testing.assert_close(many, one, atol=1e-2, rtol=1e-2)
