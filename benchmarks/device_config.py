"""The deploy config a serving benchmark runs: one model moved to another device (``--device``), and
without its compression block when the original is measured (no background search competing)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from compression.runtimes.cuda_support import CudaUnavailable, require_cuda
from server.config.settings import DeployConfig, ModelSettings, default_config, load_config

CONFIG_DIR = Path("build/benchmarks/configs")


def on_device(config: DeployConfig, model_name: str, device: str) -> DeployConfig:
    """``config`` with ``model_name`` served (and compressed) on ``device``; validated again, so the GPU
    batching defaults apply where the file leaves ``batching`` unset."""
    models = []
    for model in config.models:
        if model.name == model_name:
            exclude = set() if "batching" in model.model_fields_set else {"batching"}
            data = {**model.model_dump(mode="json", exclude=exclude), "device": device}
            if data.get("compression"):
                data["compression"]["target"]["device"] = device
            model = ModelSettings.model_validate(data)
        models.append(model)
    return config.model_copy(update={"models": models})


def without_compression(config: DeployConfig, model_name: str) -> DeployConfig:
    """``config`` with ``model_name`` served as the original only: a server that finds no cached compression
    result starts the search in a child process, which would compete with the measurement for the cores."""
    models = [m.model_copy(update={"compression": None}) if m.name == model_name else m for m in config.models]
    return config.model_copy(update={"models": models})


def benchmark_config(
    config_path: Path | None, model_name: str, *, device: str | None, compression: bool
) -> Path | None:
    """``config_path`` itself where nothing changes; else a copy with ``model_name`` on ``device`` and/or
    without its compression block, written under build/ (paths in it absolute). Exits with the reason
    when ``device`` is a GPU torch cannot see."""
    config = load_config(config_path) if config_path else default_config()
    model = next((m for m in config.models if m.name == model_name), None)
    if model is None:
        raise SystemExit(f"no model {model_name!r} in the deploy config")
    strip = not compression and model.compression is not None
    if device is None and not strip:
        return config_path
    if device is not None:
        try:
            require_cuda(device)
        except CudaUnavailable as exc:
            raise SystemExit(f"--device {device}: {exc}") from None
        config = on_device(config, model_name, device)
    if strip:
        config = without_compression(config, model_name)
    name = f"{model_name}-{(device or 'same-device').replace(':', '')}{'' if compression else '-original-only'}"
    path = CONFIG_DIR / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path.resolve()


def device_name(config_path: Path | None, model_name: str) -> str:
    """Where ``model_name`` runs, e.g. ``cuda (NVIDIA H100 80GB HBM3)`` or ``cpu``, for benchmark headers."""
    config = load_config(config_path) if config_path else default_config()
    device = next(m.device for m in config.models if m.name == model_name)
    return f"{device} ({torch.cuda.get_device_name(torch.device(device))})" if device.startswith("cuda") else device
