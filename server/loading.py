"""Turn a model's deploy settings into an eval-mode ``nn.Module`` and its labels.

Weights files are read with ``torch.load(weights_only=True)``: a state_dict of tensors, never
arbitrary pickled objects. The one exception is a ``pickle`` source, which the config must mark
``trust_pickle: true`` (its validator refuses it otherwise).
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from server.settings import (
    BuiltinSource,
    ExportSource,
    ModelSettings,
    PickleSource,
    PythonSource,
    TorchScriptSource,
    TorchvisionSource,
)

log = logging.getLogger("slimserve.loading")


class ModelLoadError(Exception):
    """The model named in the deploy config cannot be loaded; the message says why and how to fix it."""


@dataclass(frozen=True)
class LoadedModel:
    module: nn.Module
    labels: list[str]
    input_shape: tuple[int, int, int]
    """(channels, height, width) of one input row."""
    num_classes: int
    load_seconds: float
    source_file: Path | None
    """The file the weights came from (its hash keys compressed artifacts), if any."""


def load_model(settings: ModelSettings, cache_dir: Path) -> LoadedModel:
    """Load, check against the preprocessing's input shape, and report how long it took."""
    started = time.perf_counter()
    module, source_file = _load_module(settings, cache_dir)
    module.eval()
    pre = settings.preprocessing
    input_shape = (pre.channels, pre.crop, pre.crop)
    num_classes = _probe_num_classes(settings.name, module, input_shape)
    labels = _load_labels(settings, num_classes)
    seconds = time.perf_counter() - started
    log.info(
        "loaded model %r (%s) in %.2f s: input %s, %d classes",
        settings.name,
        settings.source.format,
        seconds,
        list(input_shape),
        num_classes,
    )
    return LoadedModel(module, labels, input_shape, num_classes, seconds, source_file)


def _load_module(settings: ModelSettings, cache_dir: Path) -> tuple[nn.Module, Path | None]:
    source = settings.source
    if isinstance(source, BuiltinSource):
        from server.digits.model import DigitsNet, ensure_trained

        weights = ensure_trained(cache_dir / "digits")
        model = DigitsNet()
        model.load_state_dict(_read_state_dict(weights))
        return model, weights
    if isinstance(source, TorchvisionSource):
        return _load_torchvision(settings, source), source.weights
    if isinstance(source, PythonSource):
        return _load_python(settings, source), source.weights
    if isinstance(source, TorchScriptSource):
        _require_file(source.path, "source.path")
        try:
            return torch.jit.load(str(source.path), map_location="cpu"), source.path
        except RuntimeError as exc:
            raise ModelLoadError(f"{source.path} is not a TorchScript file: {exc}") from exc
    if isinstance(source, ExportSource):
        _require_file(source.path, "source.path")
        try:
            program = torch.export.load(str(source.path))
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad archive
            raise ModelLoadError(f"{source.path} is not a torch.export program: {exc}") from exc
        return program.module(), source.path
    if isinstance(source, PickleSource):
        return _load_trusted_pickle(settings, source), source.path
    raise ModelLoadError(f"unsupported source format {source.format!r}")


def _load_torchvision(settings: ModelSettings, source: TorchvisionSource) -> nn.Module:
    known = torchvision.models.list_models(module=torchvision.models)
    if source.architecture not in known:
        raise ModelLoadError(
            f"model {settings.name!r}: unknown torchvision architecture {source.architecture!r}; "
            f"choose one of {', '.join(sorted(known))}"
        )
    num_classes = source.num_classes or _count_labels(settings) or 1000
    model = torchvision.models.get_model(
        source.architecture, weights=None, num_classes=num_classes, **source.architecture_kwargs
    )
    if source.weights is None:
        log.warning("model %r: no weights file given, serving random weights", settings.name)
        return model
    _require_file(source.weights, "source.weights")
    state_dict = _read_state_dict(source.weights)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"model {settings.name!r}: {source.weights} does not fit {source.architecture} "
            f"with {num_classes} classes (set source.num_classes to the weights' class count): {exc}"
        ) from exc
    return model


def _load_python(settings: ModelSettings, source: PythonSource) -> nn.Module:
    module_name, _, attribute = source.factory.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(
            f"model {settings.name!r}: cannot import source.factory {source.factory!r}: {exc}"
        ) from exc
    model = factory(**source.kwargs)
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"model {settings.name!r}: {source.factory} returned {type(model).__name__}, not a Module")
    if source.weights is not None:
        _require_file(source.weights, "source.weights")
        try:
            model.load_state_dict(_read_state_dict(source.weights))
        except RuntimeError as exc:
            raise ModelLoadError(
                f"model {settings.name!r}: {source.weights} does not fit {source.factory}: {exc}"
            ) from exc
    return model


def _load_trusted_pickle(settings: ModelSettings, source: PickleSource) -> nn.Module:
    """A whole pickled module; only reached when the config set ``trust_pickle: true`` for this file."""
    if not source.trust_pickle:  # the settings validator refuses this already; never unpickle untrusted files
        raise ModelLoadError(f"model {settings.name!r}: source.trust_pickle is false; refusing to unpickle")
    _require_file(source.path, "source.path")
    log.warning("model %r: unpickling %s (trust_pickle: true)", settings.name, source.path)
    try:
        model = torch.load(source.path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - the unpickler raises many types
        raise ModelLoadError(f"model {settings.name!r}: cannot unpickle {source.path}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"model {settings.name!r}: {source.path} holds a {type(model).__name__}, not a Module")
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the unpickler raises many types
        raise ModelLoadError(
            f"{path} is not a state_dict that loads with weights_only=True (full pickled models are refused; "
            f"for a whole model you trust use source {{format: pickle, path: ..., trust_pickle: true}}): {exc}"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} holds a {type(state).__name__}, expected a state_dict")
    return state


def _require_file(path: Path | None, field: str) -> None:
    if path is None or not path.is_file():
        raise ModelLoadError(f"{field}: file {path} does not exist")


def _count_labels(settings: ModelSettings) -> int | None:
    if settings.labels is not None:
        return len(settings.labels)
    if settings.labels_file is not None and settings.labels_file.is_file():
        return len(_read_labels_file(settings.labels_file))
    return None


def _read_labels_file(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _load_labels(settings: ModelSettings, num_classes: int) -> list[str]:
    if settings.labels is not None:
        labels = list(settings.labels)
    elif settings.labels_file is not None:
        _require_file(settings.labels_file, "labels_file")
        labels = _read_labels_file(settings.labels_file)
    else:
        return [str(i) for i in range(num_classes)]
    if len(labels) != num_classes:
        raise ModelLoadError(f"model {settings.name!r} has {num_classes} outputs but {len(labels)} labels were given")
    return labels


def _probe_num_classes(name: str, module: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Run one zero image through the model: checks the preprocessing's shape and counts classes."""
    try:
        with torch.inference_mode():
            out = module(torch.zeros((1, *input_shape)))
    except Exception as exc:  # noqa: BLE001 - any failure here means the config and model disagree
        raise ModelLoadError(
            f"model {name!r} fails on an input of shape {[1, *input_shape]} "
            f"(check preprocessing.channels and preprocessing.crop): {exc}"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelLoadError(f"model {name!r} must return logits of shape [batch, classes], got {shape}")
    return int(out.shape[1])
