"""The server with ``device: cuda``, spoken to by the stock Triton client: same answers as the CPU, GPU metrics."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton

from compression.models.digits.data import load_splits, normalize
from compression.models.loading import load_model
from tests.gpu.conftest import digits_on
from tests.serving import ServerThread, running_server, sample_value, scrape

MODEL = "digits"


@pytest.fixture(scope="module")
def gpu_server(gpu_cache: Path) -> Iterator[ServerThread]:
    with running_server(digits_on("cuda", gpu_cache)) as server:
        yield server


@pytest.fixture(scope="module")
def client(gpu_server: ServerThread) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(gpu_server.address)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return normalize(load_splits()["test"].images[:64])


def infer(client: triton.InferenceServerClient, batch: np.ndarray) -> np.ndarray:
    tensor = triton.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    return client.infer(MODEL, [tensor]).as_numpy("logits")


def cpu_logits(cache: Path, batch: np.ndarray) -> np.ndarray:
    """The same weights in fp32 on the CPU."""
    config = digits_on("cpu", cache)
    module = load_model(config.models[0], cache).module.eval()
    with torch.inference_mode():
        return module(torch.from_numpy(batch)).numpy()


def test_logits_match_cpu_fp32(client: triton.InferenceServerClient, images: np.ndarray, gpu_cache: Path) -> None:
    gpu = infer(client, images)
    cpu = cpu_logits(gpu_cache, images)
    assert gpu.shape == cpu.shape == (64, 10)
    # NOTE: cuDNN convolutions run in TF32 on Ampere and later: close to fp32, not equal.
    np.testing.assert_allclose(gpu, cpu, rtol=1e-2, atol=1e-2 * float(np.abs(cpu).max()))
    assert (gpu.argmax(1) == cpu.argmax(1)).mean() >= 0.98


def test_model_config_reports_the_gpu_and_gpu_batching(client: triton.InferenceServerClient) -> None:
    config = client.get_model_config(MODEL, as_json=True)["config"]
    assert config["instance_group"][0]["kind"] == "KIND_GPU"
    assert int(config["max_batch_size"]) == 64
    assert int(config["dynamic_batching"]["max_queue_delay_microseconds"]) == 2000


def test_concurrent_requests_share_gpu_batches(
    client: triton.InferenceServerClient, images: np.ndarray, gpu_server: ServerThread
) -> None:
    expected = infer(client, images).argmax(1)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: infer(client, images[i : i + 1]).argmax(1)[0], range(len(images))))
    assert (np.array(answers) == expected).mean() >= 0.98
    samples = scrape(gpu_server)["slimserve_batch_size"]
    assert sample_value(samples, "slimserve_batch_size_count", model=MODEL) >= 1


def test_gpu_metrics_are_exported(client: triton.InferenceServerClient, gpu_server: ServerThread) -> None:
    families = scrape(gpu_server)
    device = {"device": "cuda:0"}
    assert (
        sample_value(families["slimserve_gpu_torch_allocated_bytes"], "slimserve_gpu_torch_allocated_bytes", **device)
        > 0
    )
    assert (
        sample_value(families["slimserve_gpu_torch_reserved_bytes"], "slimserve_gpu_torch_reserved_bytes", **device) > 0
    )
    total = sample_value(families["slimserve_gpu_memory_total_bytes"], "slimserve_gpu_memory_total_bytes", **device)
    used = sample_value(families["slimserve_gpu_memory_used_bytes"], "slimserve_gpu_memory_used_bytes", **device)
    utilization = sample_value(families["slimserve_gpu_utilization_ratio"], "slimserve_gpu_utilization_ratio", **device)
    assert 0 < used <= total
    assert 0.0 <= utilization <= 1.0
    info = families["slimserve_variant_info"]
    assert any(s.labels.get("device") == "cuda" and s.labels.get("model") == MODEL for s in info)
