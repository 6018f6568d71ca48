"""GPU series for Prometheus, per GPU a served model uses: NVML memory and utilisation, torch's allocator.

Registered on the server's registry only when some model is served on ``cuda[:N]``
(:func:`register_gpu_metrics`). NVML comes from the ``pynvml`` module of ``nvidia-ml-py``; where it
cannot start (no driver library, a container without it) the NVML series are left out, the torch
allocator series stay, and that is logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Any, Protocol

import torch
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("slimserve.gpu_metrics")

LABELS = ("device", "gpu")
"""``device``: ``cuda:N`` as torch numbers it (the index models are placed by); ``gpu``: the GPU model."""
_NVML_HELP = {
    "slimserve_gpu_memory_used_bytes": "GPU memory in use on the device, all processes (NVML).",
    "slimserve_gpu_memory_total_bytes": "GPU memory on the device (NVML).",
    "slimserve_gpu_utilization_ratio": "Share of the driver's last sample period a kernel was running (NVML), 0..1.",
}
_TORCH_HELP = {
    "slimserve_gpu_torch_allocated_bytes": "GPU memory in this process's live tensors (torch memory_allocated).",
    "slimserve_gpu_torch_reserved_bytes": "GPU memory this process's caching allocator holds (torch memory_reserved).",
}


class GpuInfo(Protocol):
    """What the collector asks torch about a GPU, by torch's device index (a fake one in CPU tests)."""

    def name(self, index: int) -> str: ...

    def pci(self, index: int) -> tuple[int, int, int]:
        """PCI (domain, bus, device): how a torch index is matched to NVML's numbering."""
        ...

    def allocated(self, index: int) -> int: ...

    def reserved(self, index: int) -> int: ...


class TorchGpuInfo:
    def name(self, index: int) -> str:
        return torch.cuda.get_device_name(index)

    def pci(self, index: int) -> tuple[int, int, int]:
        props = torch.cuda.get_device_properties(index)
        # NOTE: torch's stub of _CudaDeviceProperties lacks the pci_* fields it has at runtime.
        return props.pci_domain_id, props.pci_bus_id, props.pci_device_id  # type: ignore[attr-defined]

    def allocated(self, index: int) -> int:
        return torch.cuda.memory_allocated(index)

    def reserved(self, index: int) -> int:
        return torch.cuda.memory_reserved(index)


def load_nvml() -> ModuleType | None:
    """``pynvml`` with NVML initialised, or None (logged) where NVML cannot start."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, driver mismatch...
        log.warning("NVML unavailable (%s): GPU memory and utilisation series are not exported", exc)
        return None
    return pynvml


class GpuCollector(Collector):
    """Reads the figures at scrape time; an unreadable figure is left out (logged once), never an error."""

    def __init__(self, indices: Iterable[int], nvml: Any | None, info: GpuInfo | None = None) -> None:
        self.indices = sorted(set(indices))
        self._nvml = nvml
        self._info = info or TorchGpuInfo()
        self._handles: dict[int, Any] = {}
        self._warned: set[str] = set()

    def describe(self) -> Iterator[Metric]:
        # NOTE: defined so registering never calls collect() (which would start CUDA and NVML early).
        for name, doc in (*_NVML_HELP.items(), *_TORCH_HELP.items()):
            yield GaugeMetricFamily(name, doc, labels=LABELS)

    def collect(self) -> Iterator[Metric]:
        families = {name: GaugeMetricFamily(name, doc, labels=LABELS) for name, doc in _TORCH_HELP.items()}
        if self._nvml is not None:
            families.update({name: GaugeMetricFamily(name, doc, labels=LABELS) for name, doc in _NVML_HELP.items()})
        for index in self.indices:
            try:
                labels = [f"cuda:{index}", self._info.name(index)]
                families["slimserve_gpu_torch_allocated_bytes"].add_metric(labels, self._info.allocated(index))
                families["slimserve_gpu_torch_reserved_bytes"].add_metric(labels, self._info.reserved(index))
            except Exception as exc:  # noqa: BLE001 - a scrape must not fail because one GPU cannot be read
                self._warn_once("torch", f"cannot read torch's allocator on cuda:{index}: {exc}")
                continue
            if self._nvml is not None:
                self._add_nvml(self._nvml, index, labels, families)
        yield from families.values()

    def _add_nvml(self, nvml: Any, index: int, labels: list[str], families: dict[str, GaugeMetricFamily]) -> None:
        try:
            handle = self._handle(nvml, index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            utilization = nvml.nvmlDeviceGetUtilizationRates(handle)
        except Exception as exc:  # noqa: BLE001 - NVMLError and its many subclasses
            self._warn_once("nvml", f"cannot read NVML figures of cuda:{index}: {exc}")
            return
        families["slimserve_gpu_memory_used_bytes"].add_metric(labels, memory.used)
        families["slimserve_gpu_memory_total_bytes"].add_metric(labels, memory.total)
        families["slimserve_gpu_utilization_ratio"].add_metric(labels, utilization.gpu / 100)

    def _handle(self, nvml: Any, index: int) -> Any:
        """NVML's handle of torch's device ``index``, matched by PCI address (``nvml``: the started pynvml).

        NOTE: NVML numbers every GPU on the machine by PCI order; torch numbers the visible ones
        (CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER), so the two indices can differ.
        """
        if index not in self._handles:
            wanted = self._info.pci(index)
            for nvml_index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(nvml_index)
                pci = nvml.nvmlDeviceGetPciInfo(handle)
                if (pci.domain, pci.bus, pci.device) == wanted:
                    self._handles[index] = handle
                    break
            else:
                raise LookupError(f"no NVML device at PCI {wanted[0]:04x}:{wanted[1]:02x}:{wanted[2]:02x}")
        return self._handles[index]

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s (reported once)", message)


def cuda_indices(devices: Iterable[str]) -> list[int]:
    """torch's indices of the ``cuda[:N]`` devices among ``devices`` (``cuda`` alone is device 0)."""
    return sorted({torch.device(d).index or 0 for d in devices if d.startswith("cuda")})


def register_gpu_metrics(registry: CollectorRegistry, devices: Iterable[str]) -> GpuCollector | None:
    """Export GPU series on ``registry`` for the GPUs among ``devices`` (models' devices); None if none."""
    indices = cuda_indices(devices)
    if not indices:
        return None
    collector = GpuCollector(indices, load_nvml())
    registry.register(collector)
    return collector
