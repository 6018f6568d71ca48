"""TorchScript and torch.export sources load, serve and compress like a python factory + weights.

The model is OddNet (strided, depthwise, pointwise and transposed convolutions, BatchNorm, a linear head),
saved once as a state_dict, as scripted and traced TorchScript and as a torch.export program with a
dynamic batch. Served logits are compared with the eager model's, over the stock Triton client.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.fx as fx
import tritonclient.grpc as triton
from torch import nn

from compression.models.loading import ModelLoadError, load_model
from compression.search.pipeline import compress
from compression.search.runner import OPAQUE_TORCHSCRIPT
from compression.techniques.analysis import count_macs
from server import cli
from server.config.settings import DeployConfig, ModelSettings
from tests.models import OddNet, calibrated
from tests.serving import running_server

MAX_BATCH = 8
LABELS = ["a", "b", "c", "d", "e"]
SOURCES: dict[str, dict[str, str]] = {
    "python": {"format": "python", "factory": "tests.models:OddNet", "weights": "oddnet.pt"},
    "torchscript": {"format": "torchscript", "path": "scripted.ts"},
    "torchscript-traced": {"format": "torchscript", "path": "traced.ts"},
    "export": {"format": "export", "path": "oddnet.pt2"},
}
LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.Linear)


class Files:
    def __init__(self, root: Path) -> None:
        self.root = root
        torch.manual_seed(0)
        self.images = torch.randn(300, 3, 32, 32)
        self.model = calibrated(OddNet(), self.images)
        example = self.images[:2]
        torch.save(self.model.state_dict(), root / "oddnet.pt")
        torch.jit.save(torch.jit.script(self.model), root / "scripted.ts")
        torch.jit.save(torch.jit.trace(self.model, example), root / "traced.ts")
        for name, batch in [("oddnet", 64), ("fixed_batch", None), ("max4", 4)]:
            dynamic = None if batch is None else ({0: torch.export.Dim("batch", min=1, max=batch)},)
            program = torch.export.export(self.model, (example,), dynamic_shapes=dynamic)
            torch.export.save(program, root / f"{name}.pt2")
        (root / "truncated.ts").write_bytes((root / "scripted.ts").read_bytes()[:4000])
        (root / "truncated.pt2").write_bytes((root / "oddnet.pt2").read_bytes()[:4000])
        torch.save({"images": self.images}, root / "data.pt")  # no labels: fidelity is agreement

    def logits(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.from_numpy(batch)).numpy()

    def settings(self, source: dict[str, str], **extra: Any) -> dict[str, Any]:
        paths = {k: str(self.root / v) if k in ("path", "weights") else v for k, v in source.items()}
        return {
            "name": "oddnet",
            "source": paths,
            "labels": LABELS,
            "preprocessing": {"channels": 3, "resize": 32, "crop": 32},
            "batching": {"max_batch_size": MAX_BATCH},
            **extra,
        }

    def config(self, source: dict[str, str], cache: str = "cache", **extra: Any) -> DeployConfig:
        return DeployConfig.model_validate(
            {"cache_dir": str(self.root / cache), "models": [self.settings(source, **extra)]}
        )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    return Files(tmp_path_factory.mktemp("formats"))


def infer(client: triton.InferenceServerClient, batch: np.ndarray, version: str = "") -> np.ndarray:
    x = triton.InferInput("input", list(batch.shape), "FP32")
    x.set_data_from_numpy(batch)
    result = client.infer("oddnet", [x], model_version=version)
    return result.as_numpy("logits")


@pytest.mark.parametrize("kind", SOURCES)
def test_each_format_serves_the_models_logits_at_any_batch_size(files: Files, kind: str) -> None:
    with running_server(files.config(SOURCES[kind])) as server:
        client = triton.InferenceServerClient(server.address)
        metadata = client.get_model_metadata("oddnet", as_json=True)
        assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "3", "32", "32"]}]
        assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "5"]}]
        rng = np.random.default_rng(1)
        for rows in (1, 5, MAX_BATCH):
            batch = rng.standard_normal((rows, 3, 32, 32), dtype=np.float32)
            np.testing.assert_allclose(infer(client, batch), files.logits(batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["torchscript", "torchscript-traced", "export"])
def test_a_graph_source_is_imported_with_the_models_layers_and_names(files: Files, kind: str) -> None:
    """What compression works on: real conv/BN/linear layers under the original names, same tensors."""
    loaded = load_model(ModelSettings.model_validate(files.settings(SOURCES[kind])), files.root)
    module = loaded.module
    assert isinstance(module, fx.GraphModule) and not module.training
    layers = {name: type(m) for name, m in module.named_modules() if isinstance(m, LAYERS)}
    assert layers == {name: type(m) for name, m in files.model.named_modules() if isinstance(m, LAYERS)}
    state = module.state_dict()
    assert state.keys() == files.model.state_dict().keys()
    for key, value in files.model.state_dict().items():
        assert torch.equal(state[key], value), key
    assert loaded.source_file == files.root / SOURCES[kind]["path"]
    module.train()  # NOTE: what distillation does; the pinned train() of ExportedProgram.module() raised
    module.eval()


def test_an_export_the_importer_cannot_handle_is_served_as_exported(
    files: Files, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unsupported(program: object) -> None:
        raise NotImplementedError("an op the importer does not know")

    monkeypatch.setattr("compression.models.loading.import_program", unsupported)
    with caplog.at_level(logging.WARNING, "slimserve.loading"):
        loaded = load_model(ModelSettings.model_validate(files.settings(SOURCES["export"])), files.root)
    assert f"cannot import the layers of {files.root / 'oddnet.pt2'}" in caplog.text
    assert "an op the importer does not know" in caplog.text
    batch = np.random.default_rng(2).standard_normal((5, 3, 32, 32), dtype=np.float32)
    with torch.inference_mode():
        np.testing.assert_allclose(loaded.module(torch.from_numpy(batch)).numpy(), files.logits(batch), atol=1e-5)


BAD_FILES = [
    (
        "torchscript path holds an export archive",
        {"format": "torchscript", "path": "oddnet.pt2"},
        "source.path FOLDER/oddnet.pt2 is a torch.export program, not TorchScript: use source {format: export",
    ),
    (
        "truncated torchscript",
        {"format": "torchscript", "path": "truncated.ts"},
        "source.path FOLDER/truncated.ts is not TorchScript: it is not a complete zip archive as torch.jit.save "
        "writes (truncated, or another kind of file)",
    ),
    (
        "torchscript path holds a state_dict",
        {"format": "torchscript", "path": "oddnet.pt"},
        "source.path FOLDER/oddnet.pt is a torch.save checkpoint (a state_dict or a pickled module), not "
        "TorchScript: give a state_dict as the weights of a torchvision or python source",
    ),
    (
        "export path holds TorchScript",
        {"format": "export", "path": "scripted.ts"},
        "source.path FOLDER/scripted.ts is TorchScript, not a torch.export program: use source {format: torchscript",
    ),
    (
        "truncated export",
        {"format": "export", "path": "truncated.pt2"},
        "source.path FOLDER/truncated.pt2 is not a torch.export program: it is not a complete zip archive",
    ),
    (
        "export with a fixed batch",
        {"format": "export", "path": "fixed_batch.pt2"},
        "FOLDER/fixed_batch.pt2 was exported for a fixed batch of 2 row(s), but the server runs batches of 1 to "
        "batching.max_batch_size=8 rows: export with a dynamic batch",
    ),
    (
        "export for smaller batches",
        {"format": "export", "path": "max4.pt2"},
        "FOLDER/max4.pt2 accepts batches of at most 4 rows, but batching.max_batch_size is 8",
    ),
    ("missing file", {"format": "export", "path": "absent.pt2"}, "source.path: file FOLDER/absent.pt2 does not exist"),
]


@pytest.mark.parametrize(("source", "message"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_a_bad_model_file_stops_serve_with_a_message_naming_it(
    files: Files, caplog: pytest.LogCaptureFixture, source: dict[str, str], message: str
) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelSettings.model_validate(files.settings(source)), files.root)
    expected = message.replace("FOLDER", str(files.root))
    assert expected in str(info.value) and "\n" not in str(info.value)
    config = files.root / "deploy.yaml"
    yaml_source = "{" + ", ".join(f"{k}: {v}" for k, v in source.items()) + "}"  # NOTE: paths relative to the file
    config.write_text(
        "server: {host: 127.0.0.1, grpc_port: 0, http_port: 0, metrics_port: 0}\n"
        f"models:\n  - {{name: oddnet, source: {yaml_source}, preprocessing: {{resize: 32, crop: 32}},"
        f" batching: {{max_batch_size: {MAX_BATCH}}}}}\n"
    )
    with caplog.at_level(logging.INFO):
        assert cli.main(["serve", "--config", str(config)]) == 2
    assert expected in caplog.text and "ready: serving" not in caplog.text


COMPRESSION_CANDIDATES: list[dict[str, Any]] = [
    {
        "name": "bn-fold-onnxruntime",
        "steps": [{"technique": "bn_fold"}],
        "realization": {"runtime": "onnxruntime", "precision": "fp32"},
    },
    {"name": "int8-onnxruntime", "realization": {"runtime": "onnxruntime", "precision": "int8"}},
    {
        "name": "pruned",
        "steps": [{"technique": "channel_prune", "ratio": 0.5, "distillation": {"epochs": 1}}],
        "realization": {"runtime": "eager", "precision": "fp32"},
    },
    {
        "name": "sparse",
        "steps": [{"technique": "magnitude_prune", "sparsity": 0.5}],
        "realization": {"runtime": "eager", "precision": "fp32"},
    },
]


def compression_block(candidates: list[dict[str, Any]], files: Files) -> dict[str, Any]:
    return {
        "budget": {"max_accuracy_drop": None, "min_agreement": 0.5},
        "data": {
            "source": "tensor_file",
            "path": str(files.root / "data.pt"),
            "calibration_size": 200,
            "validation_size": 100,
        },
        "measurement": {"warmup": 3, "iterations": 10},
        "candidates": candidates,
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["torchscript", "export"])
def test_every_technique_builds_from_a_graph_source_and_the_result_is_served(files: Files, kind: str) -> None:
    config = files.config(
        SOURCES[kind], cache=f"cache-{kind}", compression=compression_block(COMPRESSION_CANDIDATES, files)
    )
    settings = config.models[0]
    report = compress(settings, load_model(settings, config.resolved_cache_dir()), config.resolved_cache_dir()).report
    by_name = {c.name: c for c in report.candidates}
    assert set(by_name) == {c["name"] for c in COMPRESSION_CANDIDATES}
    assert {name: c.error for name, c in by_name.items()} == dict.fromkeys(by_name), "every candidate must build"
    original = report.original
    assert original.macs == count_macs(files.model, files.images[:1])  # the layers are seen, as in the eager model
    assert original.params == sum(p.numel() for p in files.model.parameters())
    folded, pruned = by_name["bn-fold-onnxruntime"], by_name["pruned"]
    assert folded.params is not None and original.params is not None and pruned.macs is not None
    assert folded.params < original.params  # the BatchNorms' scale and shift are gone
    assert pruned.macs < original.macs
    assert by_name["sparse"].sparsity and by_name["sparse"].sparsity >= 0.45
    for candidate in report.candidates:
        assert candidate.latency_p95_ms and candidate.agreement is not None and candidate.agreement >= 0.9

    with running_server(config) as server:  # NOTE: a cache hit: the chosen variant serves at once
        client = triton.InferenceServerClient(server.address)
        assert server.server.registry.get("oddnet").default_variant == report.chosen
        batch = np.random.default_rng(3).standard_normal((5, 3, 32, 32), dtype=np.float32)
        np.testing.assert_allclose(infer(client, batch, "original"), files.logits(batch), rtol=1e-5, atol=1e-5)
        assert infer(client, batch, report.chosen).shape == (5, 5)


@pytest.mark.slow
def test_torchscript_that_cannot_be_converted_serves_and_says_why_techniques_fail(
    files: Files, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unconvertible(module: object, example: object) -> None:
        raise RuntimeError("Unsupported node kind prim::Example")

    monkeypatch.setattr("compression.models.loading.torchscript_to_program", unconvertible)
    candidates: list[dict[str, Any]] = [
        *COMPRESSION_CANDIDATES[:2],
        {
            "name": "student",
            "steps": [{"technique": "student", "architecture": "depthwise_separable", "distillation": {"epochs": 1}}],
            "realization": {"runtime": "onnxruntime", "precision": "fp32"},
        },
    ]
    config = files.config(
        SOURCES["torchscript"], cache="cache-opaque", compression=compression_block(candidates, files)
    )
    settings = config.models[0]
    with caplog.at_level(logging.WARNING, "slimserve.loading"):
        loaded = load_model(settings, config.resolved_cache_dir())
    assert isinstance(loaded.module, torch.jit.ScriptModule)
    assert f"cannot convert TorchScript {files.root / 'scripted.ts'} to a torch.export graph" in caplog.text
    batch = np.random.default_rng(4).standard_normal((5, 3, 32, 32), dtype=np.float32)
    with torch.inference_mode():
        np.testing.assert_allclose(loaded.module(torch.from_numpy(batch)).numpy(), files.logits(batch), atol=1e-5)

    report = compress(settings, loaded, config.resolved_cache_dir()).report
    errors = {c.name: c.error for c in report.candidates}
    assert errors == {
        "bn-fold-onnxruntime": f"TechniqueError: bn_fold: {OPAQUE_TORCHSCRIPT}",
        "int8-onnxruntime": f"TechniqueError: onnxruntime int8: {OPAQUE_TORCHSCRIPT}",
        "student": None,
    }
    assert "\n" not in OPAQUE_TORCHSCRIPT
