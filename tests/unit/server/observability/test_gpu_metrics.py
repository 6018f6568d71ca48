"""GPU metrics with a fake NVML and a fake torch: the series, the PCI matching, and graceful absence."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.app import SlimServer
from server.config.settings import DeployConfig, ModelSettings
from server.observability.gpu_metrics import GpuCollector, cuda_indices, register_gpu_metrics

GIB = 1 << 30


class FakeInfo:
    """Two GPUs as torch sees them: cuda:0 at PCI bus 0x41, cuda:1 at bus 0x01."""

    buses = {0: 0x41, 1: 0x01}

    def name(self, index: int) -> str:
        return "Fake GPU"

    def pci(self, index: int) -> tuple[int, int, int]:
        return 0, self.buses[index], 0

    def allocated(self, index: int) -> int:
        return (index + 1) * GIB

    def reserved(self, index: int) -> int:
        return (index + 2) * GIB


class FakeNvml:
    """NVML numbers GPUs by PCI order, so cuda:0 (bus 0x41) is its device 1."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.devices = [
            {"pci": SimpleNamespace(domain=0, bus=0x01, device=0), "used": 5 * GIB, "util": 10},
            {"pci": SimpleNamespace(domain=0, bus=0x41, device=0), "used": 7 * GIB, "util": 85},
        ]

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict[str, Any]:
        return self.devices[index]

    def nvmlDeviceGetPciInfo(self, handle: dict[str, Any]) -> Any:
        return handle["pci"]

    def nvmlDeviceGetMemoryInfo(self, handle: dict[str, Any]) -> Any:
        if self.fail:
            raise RuntimeError("NVML lost the GPU")
        return SimpleNamespace(used=handle["used"], total=80 * GIB)

    def nvmlDeviceGetUtilizationRates(self, handle: dict[str, Any]) -> Any:
        return SimpleNamespace(gpu=handle["util"])


def scrape(collector: GpuCollector) -> dict[str, dict[str, float]]:
    """family name -> device label -> value."""
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {f.name: {s.labels["device"]: s.value for s in f.samples} for f in text_string_to_metric_families(text)}


def test_series_per_gpu_matched_to_nvml_by_pci() -> None:
    families = scrape(GpuCollector([1, 0], FakeNvml(), FakeInfo()))
    assert families["slimserve_gpu_memory_used_bytes"] == {"cuda:0": 7 * GIB, "cuda:1": 5 * GIB}
    assert families["slimserve_gpu_memory_total_bytes"] == {"cuda:0": 80 * GIB, "cuda:1": 80 * GIB}
    assert families["slimserve_gpu_utilization_ratio"] == {"cuda:0": 0.85, "cuda:1": 0.10}
    assert families["slimserve_gpu_torch_allocated_bytes"] == {"cuda:0": GIB, "cuda:1": 2 * GIB}
    assert families["slimserve_gpu_torch_reserved_bytes"] == {"cuda:0": 2 * GIB, "cuda:1": 3 * GIB}


def test_without_nvml_only_torch_series_remain() -> None:
    families = scrape(GpuCollector([0], None, FakeInfo()))
    assert set(families) == {"slimserve_gpu_torch_allocated_bytes", "slimserve_gpu_torch_reserved_bytes"}


def test_an_nvml_failure_is_logged_once_and_the_scrape_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    collector = GpuCollector([0], FakeNvml(fail=True), FakeInfo())
    with caplog.at_level(logging.WARNING, logger="slimserve.gpu_metrics"):
        for _ in range(3):
            families = scrape(collector)
    assert families["slimserve_gpu_torch_allocated_bytes"] == {"cuda:0": GIB}
    assert families["slimserve_gpu_memory_used_bytes"] == {}
    assert [r.message for r in caplog.records].count(
        "cannot read NVML figures of cuda:0: NVML lost the GPU (reported once)"
    ) == 1


def test_registered_only_for_models_on_a_gpu() -> None:
    assert cuda_indices(["cpu", "cuda", "cuda:0", "cuda:3"]) == [0, 3]
    assert register_gpu_metrics(CollectorRegistry(), ["cpu"]) is None
    registry = CollectorRegistry()
    collector = register_gpu_metrics(registry, ["cpu", "cuda:1"])
    assert collector is not None and collector.indices == [1]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_server_registers_gpu_series_for_a_cuda_model(device: str) -> None:
    """Construction only: nothing is loaded, so this runs without a GPU."""
    model = ModelSettings.model_validate({"name": "m", "source": {"format": "builtin"}, "device": device})
    server = SlimServer(DeployConfig(models=[model]))
    try:
        text = generate_latest(server.metrics.registry).decode()
    finally:
        server._inference_pool.shutdown()
        server._decode_pool.shutdown()
    assert ("# TYPE slimserve_gpu_torch_allocated_bytes gauge" in text) == (device == "cuda")
