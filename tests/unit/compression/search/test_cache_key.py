"""The compression cache key separates device classes: a GPU replica never loads a CPU artifact."""

from __future__ import annotations

import torch
from torch import nn

from compression.models.loading import LoadedModel
from compression.search.cache import accelerator_class, cache_key
from compression.search.pipeline import compression_key
from compression.search.settings import CompressionSettings
from server.config.settings import ModelSettings, default_config


def digits_on(device: str) -> ModelSettings:
    """The default digits settings, served and compressed for ``device``."""
    settings = default_config().models[0]
    compression = CompressionSettings.model_validate({"target": {"device": device}})
    return settings.model_copy(update={"device": device, "compression": compression})


def loaded_without_file() -> LoadedModel:
    return LoadedModel(nn.Identity(), list("0123456789"), (1, 28, 28), 10, 0.0, source_file=None)


def test_cpu_and_gpu_targets_get_different_keys() -> None:
    loaded = loaded_without_file()
    cpu_key, cpu_inputs = compression_key(digits_on("cpu"), loaded)
    gpu_key, gpu_inputs = compression_key(digits_on("cuda"), loaded)
    assert cpu_key != gpu_key
    assert cpu_inputs["device"] == "cpu" and gpu_inputs["device"] == "cuda"
    assert "accelerator" not in cpu_inputs and gpu_inputs["accelerator"] == accelerator_class("cuda")


def test_gpu_key_names_the_gpu_class() -> None:
    accelerator = accelerator_class("cuda:0")
    if torch.cuda.is_available():
        assert accelerator is not None and accelerator.startswith(torch.cuda.get_device_name(0))
    else:
        assert accelerator == "cuda-unavailable"
    assert accelerator_class("cpu") is None


def test_key_is_stable_for_the_same_inputs() -> None:
    inputs = dict(model_file=None, model_settings={"a": 1}, compression_settings={"b": 2}, device="cpu")
    assert cache_key(**inputs) == cache_key(**inputs)  # type: ignore[arg-type]
