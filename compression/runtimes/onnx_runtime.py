"""ONNX Runtime: an .onnx file (dynamo exporter, dynamic batch) run by an InferenceSession.

int8 is static QDQ quantization with U8S8 and ``reduce_range``: on CPUs without VNNI the default S8S8
is no faster than fp32 (see MEASURED.md), while U8S8 with 7-bit weights avoids the saturating
multiply-add overflow that makes the fast AVX2 kernel inexact.
"""

from __future__ import annotations

import ast
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compression.models.names import INPUT_NAME, OUTPUT_NAME
from compression.runtimes.common import batch_dynamic_shapes, float_model
from compression.runtimes.manifest import Manifest, check_compatible
from compression.runtimes.predictor import InputStager, check_batch

log = logging.getLogger("slimserve.compression.realization")

MODEL_FILE = "model.onnx"
_QUANTIZABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads do not help these kernels)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def create_session(path: Path, device: torch.device) -> Any:
    """An ``onnxruntime.InferenceSession`` on ``device`` with this process's threading rules."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = physical_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # NOTE: spinning ORT threads keep burning cores after a run and slow PyTorch code in the same
    # process (mobilenet eager 19 -> 26 ms measured); the server runs both kinds side by side.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("this onnxruntime build has no CUDAExecutionProvider; use another runtime on CUDA")
        providers: list = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), options, providers=providers)


class OnnxPredictor:
    runtime = "onnxruntime"

    def __init__(
        self, session: Any, *, precision: str, device: torch.device, input_shape: tuple[int, ...], max_batch_size: int
    ) -> None:
        self.precision = precision
        self.device = device
        self.input_shape = tuple(input_shape)
        self.max_batch_size = max_batch_size
        self._session = session
        self._stager = InputStager(device, self.input_shape, max_batch_size) if device.type == "cuda" else None

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        check_batch(batch, self.input_shape, self.max_batch_size)
        if self._stager is not None:
            return self._run_on_gpu(batch)
        (out,) = self._session.run(None, {INPUT_NAME: batch.contiguous().numpy()})
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    def _run_on_gpu(self, batch: torch.Tensor) -> torch.Tensor:
        """Pinned, asynchronous upload by torch; ONNX Runtime reads the device buffer in place (IO binding)."""
        assert self._stager is not None
        staged = self._stager.stage(batch)
        # NOTE: ONNX Runtime's CUDA provider runs on its own stream: the upload must have landed first.
        torch.cuda.current_stream(self.device).synchronize()
        binding = self._session.io_binding()
        binding.bind_input(
            INPUT_NAME, "cuda", staged.device.index or 0, np.float32, list(staged.shape), staged.data_ptr()
        )
        binding.bind_output(OUTPUT_NAME, "cpu")
        self._session.run_with_iobinding(binding)
        (out,) = binding.copy_outputs_to_cpu()
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


def export_onnx(module: nn.Module, example: torch.Tensor, max_batch_size: int, path: Path) -> None:
    torch.onnx.export(
        module,
        (example,),
        str(path),
        dynamo=True,
        dynamic_shapes=batch_dynamic_shapes(max_batch_size),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        external_data=False,
        verbose=False,
    )


def save_float(
    model: nn.Module,
    precision: str,
    device: torch.device,
    example: torch.Tensor,
    max_batch_size: int,
    artifact_dir: Path,
) -> list[str]:
    # NOTE: exported on the CPU whatever the device: the execution provider places the graph.
    export_onnx(float_model(model, precision, torch.device("cpu")), example, max_batch_size, artifact_dir / MODEL_FILE)
    return [MODEL_FILE]


def load(artifact_dir: Path, manifest: Manifest, device: torch.device) -> OnnxPredictor:
    check_compatible(manifest, device, compiled=False)
    return OnnxPredictor(
        create_session(artifact_dir / MODEL_FILE, device),
        precision=manifest.precision,
        device=device,
        input_shape=tuple(manifest.input_shape),
        max_batch_size=manifest.max_batch_size,
    )


def _scope(node: Any) -> str:
    """The module path the exporter recorded for ``node`` (for logs), or its name."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s for s in ast.literal_eval(prop.value)[:-1] if s]
            return scopes[-1] if scopes else node.name
    return node.name


class OnnxInt8Builder:
    """Exports and calibrates once; each variant only re-runs ``quantize_static`` from the cache."""

    def __init__(
        self, model: nn.Module, example: torch.Tensor, calibration: Iterable[torch.Tensor], max_batch_size: int
    ) -> None:
        import onnx
        from onnxruntime.quantization.shape_inference import quant_pre_process

        self._max_batch_size = max_batch_size
        self._input_shape = tuple(example.shape[1:])
        self._tmp = tempfile.TemporaryDirectory(prefix="slimserve-onnx-int8-")
        tmp = Path(self._tmp.name)
        export_onnx(float_model(model, "fp32", torch.device("cpu")), example, max_batch_size, tmp / "fp32.onnx")
        self._prepared = tmp / "prepared.onnx"
        quant_pre_process(str(tmp / "fp32.onnx"), str(self._prepared))
        self._calibration = [batch.numpy() for batch in calibration]
        self._cache = tmp / "calibration.json"
        self._count = 0
        nodes = onnx.load(str(self._prepared), load_external_data=False).graph.node
        self._layers = [n.name for n in nodes if n.op_type in _QUANTIZABLE_OPS]
        self.labels = {n.name: _scope(n) for n in nodes if n.op_type in _QUANTIZABLE_OPS}
        self.quantization = {
            "scheme": "onnxruntime static QDQ: uint8 per-tensor activations, int8 per-channel weights",
            "reduce_range": True,
            "calibration_samples": sum(batch.shape[0] for batch in self._calibration),
        }

    def layers(self) -> list[str]:
        return list(self._layers)

    def quantize(self, float_layers: Sequence[str], path: Path) -> None:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class _Reader(CalibrationDataReader):
            def __init__(self, batches: list[np.ndarray]) -> None:
                self._batches = iter(batches)

            def get_next(self) -> dict[str, np.ndarray] | None:
                batch = next(self._batches, None)
                return None if batch is None else {INPUT_NAME: batch}

        # NOTE: tensor ranges do not depend on which nodes are excluded, so calibration runs once
        # and later variants read the ranges from the cache file.
        reader = None if self._cache.is_file() else _Reader(self._calibration)
        quantize_static(
            str(self._prepared),
            str(path),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            reduce_range=True,
            nodes_to_exclude=list(float_layers),
            calibration_cache_path=str(self._cache),
        )

    def variant(self, float_layers: Sequence[str]) -> OnnxPredictor:
        self._count += 1
        path = Path(self._tmp.name) / f"variant{self._count}.onnx"
        self.quantize(float_layers, path)
        session = create_session(path, torch.device("cpu"))
        path.unlink()  # NOTE: the session holds the model in memory; keep the temp dir small
        return OnnxPredictor(
            session,
            precision="int8",
            device=torch.device("cpu"),
            input_shape=self._input_shape,
            max_batch_size=self._max_batch_size,
        )

    def save(self, float_layers: Sequence[str], artifact_dir: Path) -> list[str]:
        self.quantize(float_layers, artifact_dir / MODEL_FILE)
        return [MODEL_FILE]

    def close(self) -> None:
        self._tmp.cleanup()


INT8_BUILDER = OnnxInt8Builder
"""int8 as a QDQ graph quantized statically by ONNX Runtime."""
