"""Turn a model's deploy settings into an eval-mode ``nn.Module`` and its labels.

Weights files are read with ``torch.load(weights_only=True)``: a state_dict of tensors, never
arbitrary pickled objects. The one exception is a ``pickle`` source, which the config must mark
``trust_pickle: true`` (its validator refuses it otherwise).

TorchScript and ``torch.export`` files are imported as an ``fx.GraphModule`` of real layers
(``compression/models/graph_import.py``), checked to compute what the file does, so that they serve with any batch
size and the compression techniques work on them as on a python source. A file the importer cannot
handle is served as it is (with a warning), and compression says per candidate why it cannot proceed.
"""

from __future__ import annotations

import importlib
import logging
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
import torchvision
from torch import nn

from compression.errors import first_line
from compression.models.graph_import import import_program, torchscript_to_program, training_batch_norms
from compression.models.settings import (
    BuiltinSource,
    ExportSource,
    ModelSpec,
    PickleSource,
    PythonSource,
    TorchScriptSource,
    TorchvisionSource,
)

log = logging.getLogger("slimserve.loading")

_IMPORT_TOLERANCE = 1e-4
"""Largest difference, relative to the largest logit (at least 1), between an imported graph and its source:
the same kernels run, so it is rounding at most."""


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


def load_model(settings: ModelSpec, cache_dir: Path) -> LoadedModel:
    """Load, check against the preprocessing's input shape, and report how long it took."""
    started = time.perf_counter()
    pre = settings.preprocessing
    input_shape = (pre.channels, pre.crop, pre.crop)
    module, source_file = _load_module(settings, cache_dir, input_shape)
    module.eval()
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


def _load_module(
    settings: ModelSpec, cache_dir: Path, input_shape: tuple[int, int, int]
) -> tuple[nn.Module, Path | None]:
    source = settings.source
    if isinstance(source, BuiltinSource):
        from compression.models.digits.model import DigitsNet, ensure_trained

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
        _check_archive(settings, source.path, "torchscript")
        try:
            script = torch.jit.load(str(source.path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad archive
            raise ModelLoadError(
                f"model {settings.name!r}: source.path {source.path} cannot be loaded as TorchScript: {first_line(exc)}"
            ) from exc
        return _import_torchscript(settings, source.path, script.eval(), input_shape), source.path
    if isinstance(source, ExportSource):
        _require_file(source.path, "source.path")
        _check_archive(settings, source.path, "export")
        try:
            program = torch.export.load(str(source.path))
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad archive
            raise ModelLoadError(
                f"model {settings.name!r}: source.path {source.path} cannot be loaded as a torch.export program: "
                f"{first_line(exc)}"
            ) from exc
        _check_program_input(settings, source.path, program)
        return _import_program(settings, source.path, program, input_shape), source.path
    if isinstance(source, PickleSource):
        return _load_trusted_pickle(settings, source), source.path
    raise ModelLoadError(f"unsupported source format {source.format!r}")


_ARCHIVE_KINDS = {
    # kind: (what it is, what writes it, how to use such a file instead)
    "torchscript": ("TorchScript", "torch.jit.save", "use source {format: torchscript, path: ...}"),
    "export": ("a torch.export program", "torch.export.save", "use source {format: export, path: ...}"),
    "torch.save": (
        "a torch.save checkpoint (a state_dict or a pickled module)",
        "torch.save",
        "give a state_dict as the weights of a torchvision or python source",
    ),
}


def _archive_kind(path: Path) -> str | None:
    """What wrote the zip archive at ``path``: "torchscript", "export", "torch.save"; None if not a zip."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    # NOTE: every entry sits under one top folder; .pt2 archives name their format, TorchScript has code/.
    if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
        return "export"
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        return "torchscript"
    if any(n.endswith("/data.pkl") for n in names):
        return "torch.save"
    return "unknown"


def _check_archive(settings: ModelSpec, path: Path, expected: str) -> None:
    """Name what is wrong with the file before torch's deserializers give their generic errors."""
    what, writer, _ = _ARCHIVE_KINDS[expected]
    kind = _archive_kind(path)
    prefix = f"model {settings.name!r}: source.path {path}"
    if kind is None:
        raise ModelLoadError(
            f"{prefix} is not {what}: it is not a complete zip archive as {writer} writes "
            "(truncated, or another kind of file)"
        )
    if kind in _ARCHIVE_KINDS and kind != expected:
        actual, _, fix = _ARCHIVE_KINDS[kind]
        raise ModelLoadError(f"{prefix} is {actual}, not {what}: {fix}")


def _check_program_input(settings: ModelSpec, path: Path, program: torch.export.ExportedProgram) -> None:
    """One image batch in, with a batch dimension that covers 1..batching.max_batch_size."""
    prefix = f"model {settings.name!r}: {path}"
    inputs = list(program.graph_signature.user_inputs)
    if len(inputs) != 1:
        raise ModelLoadError(f"{prefix} takes {len(inputs)} inputs ({', '.join(inputs)}); slimserve passes one batch")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == inputs[0])
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return
    batch, limit = value.shape[0], settings.batching.max_batch_size
    fix = (
        "export with a dynamic batch: torch.export.export(model, (x,), dynamic_shapes="
        f"({{0: torch.export.Dim('batch', min=1, max={max(limit, 2)})}},))"
    )
    if isinstance(batch, int):
        if batch != 1 or limit > 1:
            also = ", or set batching.max_batch_size: 1" if batch == 1 else ""
            raise ModelLoadError(
                f"{prefix} was exported for a fixed batch of {batch} row(s), but the server runs batches of "
                f"1 to batching.max_batch_size={limit} rows: {fix}{also}"
            )
        return
    ranges = program.range_constraints.get(batch.node.expr)
    try:
        upper = int(ranges.upper) if ranges is not None else None
    except (TypeError, ValueError, OverflowError):  # NOTE: unbounded (int_oo)
        upper = None
    if upper is not None and upper < limit:
        raise ModelLoadError(
            f"{prefix} accepts batches of at most {upper} rows, but batching.max_batch_size is {limit}: "
            f"lower max_batch_size or {fix}"
        )


def _import_program(
    settings: ModelSpec, path: Path, program: torch.export.ExportedProgram, input_shape: tuple[int, int, int]
) -> nn.Module:
    """The program as a plain GraphModule with real layers (what compression needs), checked against itself.

    NOTE: should the import fail, the program's own module serves (compression then finds no layers to
    work on); its ``train``/``eval`` are pinned to raise, and since the graph's mode was fixed at export,
    the plain ``nn.Module`` methods (which only set flags) are safe to restore.
    """
    exported = program.module()
    del exported.train, exported.eval
    module = _imported(
        settings,
        exported,
        lambda example: import_program(program),
        input_shape,
        f"cannot import the layers of {path}; serving the program as exported, and compression techniques "
        "that work on layers will fail on it",
    )
    if isinstance(module, fx.GraphModule) and module is not exported and (training := training_batch_norms(module)):
        log.warning(
            "model %r: %s has %d batch norm(s) in training mode (batch statistics, so a row's logits depend on "
            "the rest of its batch): export the model after model.eval()",
            settings.name,
            path,
            training,
        )
    return module


def _import_torchscript(
    settings: ModelSpec, path: Path, script: torch.jit.ScriptModule, input_shape: tuple[int, int, int]
) -> nn.Module:
    """TorchScript converted to a torch.export program and imported; the ScriptModule itself if that fails."""
    return _imported(
        settings,
        script,
        lambda example: import_program(torchscript_to_program(script, example)),
        input_shape,
        f"cannot convert TorchScript {path} to a torch.export graph; serving it as TorchScript, and "
        "compression can only distill a student from it",
    )


def _imported(
    settings: ModelSpec,
    original: nn.Module,
    convert: Callable[[torch.Tensor], tuple[fx.GraphModule, int]],
    input_shape: tuple[int, int, int],
    failed: str,
) -> nn.Module:
    """``convert(example)``'s module if it computes what ``original`` does, else ``original`` (with a warning)."""
    example = _example_batch(settings, input_shape)
    try:
        with torch.no_grad():
            expected = original(example)
    except Exception:  # noqa: BLE001 - the shape probe in load_model reports a model that fails on its input
        return original
    try:
        module, lifted = convert(example)
        _check_same(expected, module, example)
    except Exception as exc:  # noqa: BLE001 - torch's converter and the importer raise many types
        log.warning("model %r: %s: %s", settings.name, failed, first_line(exc))
        return original
    log.info("model %r: imported as a graph with %d layers", settings.name, lifted)
    return module


def _example_batch(settings: ModelSpec, input_shape: tuple[int, int, int]) -> torch.Tensor:
    rows = 2 if settings.batching.max_batch_size >= 2 else 1
    return torch.randn((rows, *input_shape), generator=torch.Generator().manual_seed(0))


def _check_same(expected: object, imported: nn.Module, example: torch.Tensor) -> None:
    """Raise unless ``imported(example)`` is the original's output ``expected`` up to rounding."""
    with torch.no_grad():
        got = imported(example)
    if not isinstance(got, torch.Tensor) or not isinstance(expected, torch.Tensor) or got.shape != expected.shape:
        raise ValueError("the imported graph returns something else than the original")
    error = float((got - expected).abs().max()) if got.numel() else 0.0
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    if not error <= _IMPORT_TOLERANCE * scale:
        raise ValueError(f"the imported graph's outputs differ from the original's by up to {error:.3g}")


def _load_torchvision(settings: ModelSpec, source: TorchvisionSource) -> nn.Module:
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


def _load_python(settings: ModelSpec, source: PythonSource) -> nn.Module:
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


def _load_trusted_pickle(settings: ModelSpec, source: PickleSource) -> nn.Module:
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


def _count_labels(settings: ModelSpec) -> int | None:
    if settings.labels is not None:
        return len(settings.labels)
    if settings.labels_file is not None and settings.labels_file.is_file():
        return len(_read_labels_file(settings.labels_file))
    return None


def _read_labels_file(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _load_labels(settings: ModelSpec, num_classes: int) -> list[str]:
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
