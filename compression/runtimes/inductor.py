"""Inductor runtime: an AOTInductor package (compiled ahead of time, weights frozen in).

int8 goes through torchao PT2E with the X86 inductor quantizer (per-channel weights, calibrated on
the calibration split); inductor lowers the quantize/dequantize patterns to oneDNN int8 kernels when
freezing is on. Packages are compiled with ``-march=native``: the manifest records the CPU flags.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from compression.runtimes.common import export_program, float_model
from compression.runtimes.eager import EagerPredictor
from compression.runtimes.manifest import Manifest, check_compatible, current_cpu_isa
from compression.runtimes.predictor import InputStager, check_batch

log = logging.getLogger("slimserve.compression.realization")

PACKAGE_FILE = "model_aoti.pt2"
# NOTE: without freezing, inductor keeps weights as graph inputs: no constant folding, no oneDNN
# weight prepacking and no int8 kernels; measured 0.95-1.0x of eager at batch 1 on resnets.
_INDUCTOR_CONFIGS = {"freezing": True}


class InductorPredictor:
    runtime = "inductor"

    def __init__(self, compiled: object, manifest: Manifest, device: torch.device) -> None:
        self.precision = manifest.precision
        self.device = device
        self.max_batch_size = manifest.max_batch_size
        self.input_shape = tuple(manifest.input_shape)
        self._compiled = compiled
        self._stager = InputStager(device, self.input_shape, self.max_batch_size)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        check_batch(batch, self.input_shape, self.max_batch_size)
        with torch.inference_mode():
            # NOTE: AOTInductor code assumes the traced (contiguous) strides; the stager ensures them.
            out = self._compiled(self._stager.stage(batch))  # type: ignore[operator]
            return out.to(torch.float32).cpu()


def compile_package(module: nn.Module, example: torch.Tensor, max_batch_size: int, path: Path) -> None:
    """Export ``module`` with a dynamic batch and compile it into an AOTInductor package at ``path``."""
    program = export_program(module, example, max_batch_size)
    # NOTE: inductor applies freezing only when grad is disabled; with grad on, the option is silently
    # ignored and int8 runs as dequantize + float convolution (no faster than fp32).
    with torch.no_grad():
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(path), inductor_configs=dict(_INDUCTOR_CONFIGS)
        )


def save_float(
    model: nn.Module,
    precision: str,
    device: torch.device,
    example: torch.Tensor,
    max_batch_size: int,
    artifact_dir: Path,
) -> list[str]:
    compile_package(
        float_model(model, precision, device), example.to(device), max_batch_size, artifact_dir / PACKAGE_FILE
    )
    return [PACKAGE_FILE]


def load(artifact_dir: Path, manifest: Manifest, device: torch.device) -> InductorPredictor:
    check_compatible(manifest, device, compiled=True)
    device_index = device.index if device.type == "cuda" and device.index is not None else -1
    compiled = torch._inductor.aoti_load_package(str(artifact_dir / PACKAGE_FILE), device_index=device_index)
    return InductorPredictor(compiled, manifest, device)


def quantizable_layers(model: nn.Module) -> list[str]:
    """Module names the X86 inductor quantizer quantizes (it leaves ConvTranspose2d in float)."""
    return [name for name, module in model.named_modules() if type(module) in (nn.Conv2d, nn.Linear)]


_GETATTR = re.compile(r"getattr\(([^()]*), '([^']*)'\)")


def _dotted(path: str) -> str:
    """A dynamo source path as a module name: "getattr(L['self'].features, '0')" -> "features.0"."""
    previous = None
    while previous != path:
        previous, path = path, _GETATTR.sub(r"\1.\2", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.removeprefix("L['self']").removeprefix(".")


def normalize_module_paths(graph_module: torch.fx.GraphModule) -> set[str]:
    """Rewrite ``nn_module_stack`` paths as dotted module names; returns the names seen.

    NOTE: strict export of an fx GraphModule (what fx-based BN folding returns) records paths like
    "getattr(getattr(L['self'].features, '0'), '0')"; the quantizer matches module names against
    these, so without this ``set_module_name_qconfig("features.0.0", None)`` silently does nothing.
    """
    names: set[str] = set()
    for node in graph_module.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {key: (_dotted(path), kind) for key, (path, kind) in stack.items()}
            names.update(path for path, _ in node.meta["nn_module_stack"].values())
    return names


def has_vnni() -> bool:
    return any(flag in current_cpu_isa() for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


class PT2EInt8Builder:
    """PT2E int8 for inductor: exports once, then quantizes and calibrates per set of float layers."""

    def __init__(
        self,
        model: nn.Module,
        example: torch.Tensor,
        calibration: Iterable[torch.Tensor],
        max_batch_size: int,
    ) -> None:
        # NOTE: oneDNN's int8 convolution with a single input channel is wrong on AVX2 (compiled SQNR
        # about 0 dB where the reference int8 graph has 30); such a layer is tiny, so it stays float.
        single = {name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 1}
        # NOTE: without VNNI the u8*s8 multiply-add saturates in 16 bits; 7-bit activations avoid it
        # (measured on AVX2: compiled SQNR 18 dB without reduce_range, 46.6 dB with, as the reference).
        self._reduce_range = not has_vnni()
        self._example = example
        self._calibration = list(calibration)
        self._max_batch_size = max_batch_size
        # NOTE: strict=True, because non-strict export fails to annotate resnets ("Input partition
        # has more than one output node": blocks reuse one ReLU module).
        self._exported = export_program(
            float_model(model, "fp32", torch.device("cpu")), example, max_batch_size, strict=True
        ).module()
        self._in_graph = normalize_module_paths(self._exported)
        used = [name for name in quantizable_layers(model) if name in self._in_graph]
        self._always_float = [name for name in used if name in single]
        self._layers = [name for name in used if name not in single]
        self.quantization = {
            "scheme": "torchao PT2E X86InductorQuantizer: uint8 per-tensor activations, int8 per-channel weights",
            "reduce_range": self._reduce_range,
            "calibration_samples": sum(batch.shape[0] for batch in self._calibration),
            "always_float": self._always_float,
        }

    def layers(self) -> list[str]:
        return list(self._layers)

    def quantize(self, float_layers: Sequence[str]) -> torch.fx.GraphModule:
        """The converted (reference int8) graph with ``float_layers`` left unquantized."""
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )

        unknown = sorted(set(float_layers) - self._in_graph)
        if unknown:
            raise ValueError(f"layers not in the exported graph: {', '.join(unknown)}")
        config = get_default_x86_inductor_quantization_config(reduce_range=self._reduce_range)
        quantizer = X86InductorQuantizer().set_global(config)
        for name in [*self._always_float, *float_layers]:
            quantizer.set_module_name_qconfig(name, None)
        # NOTE: prepare_pt2e rewrites its input in place; every variant starts from a fresh copy.
        prepared = prepare_pt2e(copy.deepcopy(self._exported), quantizer)
        with torch.no_grad():
            for batch in self._calibration:
                prepared(batch)
        return convert_pt2e(prepared)

    def variant(self, float_layers: Sequence[str]) -> EagerPredictor:
        return self._preview(self.quantize(float_layers))

    def _preview(self, converted: torch.fx.GraphModule) -> EagerPredictor:
        # NOTE: the reference int8 graph computes in float on (de)quantized values: close to the
        # compiled kernels (29-48 dB SQNR apart, requantization rounding), seconds instead of a compile.
        return EagerPredictor(
            converted,
            precision="int8",
            device=torch.device("cpu"),
            input_shape=tuple(self._example.shape[1:]),
            max_batch_size=self._max_batch_size,
            runtime="inductor-preview",
        )

    def save(self, float_layers: Sequence[str], artifact_dir: Path) -> list[str]:
        """Compile the variant into ``artifact_dir``; ``saved_preview`` is then its reference graph."""
        converted = self.quantize(float_layers)
        compile_package(converted, self._example, self._max_batch_size, artifact_dir / PACKAGE_FILE)
        self.saved_preview: EagerPredictor | None = self._preview(converted)
        return [PACKAGE_FILE]


INT8_BUILDER = PT2EInt8Builder
"""int8 through PT2E (torchao's X86 quantizer), compiled by AOTInductor."""
