"""Realization on tiny CNNs: every (runtime, precision) that exists builds, reloads from disk, matches
the fp32 model at batch 1, 3 and max; tampered artifacts fail; int8 fallback; latency statistics."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from compression.context import CompressionContext
from compression.runtimes.common import sqnr_db
from compression.runtimes.eager import EagerPredictor
from compression.runtimes.manifest import _ISA_FLAGS, check_compatible, current_cpu_isa, read_manifest
from compression.runtimes.predictor import Predictor
from compression.runtimes.realization import (
    SUPPORTED,
    ArtifactError,
    RealizationConfig,
    build_predictor,
    load_predictor,
)
from compression.search.latency import LatencyStats, measure_latency

SIZE, CLASSES, MAX_BATCH = 32, 10, 8
# NOTE: minimum fidelity per precision, as SQNR of the logits against the fp32 model (dB).
MIN_SQNR = {"int8": 15.0, "fp16": 30.0, "bf16": 20.0}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


class SmallNet(nn.Module):
    """Residual add, depthwise conv, ConvTranspose2d and BatchNorm: the shapes compilers trip on."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 16, 1)
        self.relu = nn.ReLU()  # NOTE: reused on purpose, as resnet blocks do (PT2E needs strict export)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.relu(x + self.relu(self.pw(self.dw(x))))
        x = self.relu(self.up(self.relu(self.down(x)))) + x
        return self.fc(x.mean((2, 3)))


def make_model(channels: int, seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    model = SmallNet(channels)
    with torch.no_grad():
        bn = model.stem[1]
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def make_ctx(model: nn.Module, channels: int, device: str = "cpu") -> CompressionContext:
    gen = torch.Generator().manual_seed(1)
    calibration = torch.randn(64, channels, SIZE, SIZE, generator=gen)
    return CompressionContext(
        calibration_inputs=calibration, example_inputs=calibration[:4], teacher=model, device=torch.device(device)
    )


def check_outputs(
    model: nn.Module, built: Predictor, artifact_dir: Path, precision: str, channels: int, device: str = "cpu"
) -> None:
    """The loaded artifact matches the built predictor and the fp32 model at batch 1, 3 and max."""
    loaded = load_predictor(artifact_dir, device)
    assert (loaded.precision, loaded.max_batch_size) == (precision, MAX_BATCH)
    for batch in (1, 3, MAX_BATCH):
        x = torch.randn(batch, channels, SIZE, SIZE)
        with torch.no_grad():
            expected = model(x)
        out = loaded(x)
        assert out.dtype == torch.float32 and out.device.type == "cpu" and out.shape == (batch, CLASSES)
        torch.testing.assert_close(built(x), out, atol=1e-5, rtol=1e-5)
        if precision == "fp32":
            torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
        else:
            assert sqnr_db(expected, out) > MIN_SQNR[precision], f"batch {batch}"


def build(
    tmp_path: Path, runtime: str, precision: str, channels: int = 3, device: str = "cpu", **options: object
) -> tuple[nn.Module, Predictor, Path]:
    model = make_model(channels)
    config = RealizationConfig(runtime=runtime, precision=precision, calibration_batches=2, **options)
    artifact_dir = tmp_path / f"{runtime}-{precision}"
    predictor = build_predictor(
        model, config, make_ctx(model, channels, device), artifact_dir, max_batch_size=MAX_BATCH
    )
    return model, predictor, artifact_dir


# --- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime,precision", [(r, p) for r, ps in SUPPORTED.items() for p in ps])
def test_supported_configs_round_trip_through_json(runtime: str, precision: str) -> None:
    config = RealizationConfig(
        runtime=runtime,
        precision=precision,
        channels_last=runtime == "eager",
        calibration_batches=3,
        max_fallback_layers=2,
    )
    assert RealizationConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"runtime": "eager", "precision": "int8"}, "does not support int8"),
        ({"runtime": "onnxruntime", "precision": "bf16"}, "does not support bf16"),
        ({"runtime": "tensorrt"}, "unknown runtime"),
        ({"precision": "int4"}, "unknown precision"),
        ({"runtime": "inductor", "channels_last": True}, "channels_last applies to the eager runtime"),
        ({"runtime": "onnxruntime", "channels_last": True}, "channels_last applies to the eager runtime"),
        ({"channels_last": "yes"}, "must be a bool"),
        ({"calibration_batches": 0}, "calibration_batches"),
        ({"max_fallback_layers": -1}, "max_fallback_layers"),
    ],
)
def test_config_rejects_what_does_not_exist(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RealizationConfig(**fields)


def test_config_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match="unknown realization field"):
        RealizationConfig.from_dict({"runtime": "eager", "precison": "fp16"})


# --- build, reload, fidelity ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "runtime,precision,channels,channels_last",
    [
        ("eager", "fp32", 3, False),
        ("eager", "fp32", 1, True),
        ("eager", "fp16", 3, True),
        ("eager", "bf16", 1, False),
        ("onnxruntime", "fp32", 1, False),
        ("onnxruntime", "int8", 3, False),
        ("onnxruntime", "int8", 1, False),
        ("onnxruntime", "fp16", 3, False),
    ],
)
def test_build_reload_matches_fp32(
    tmp_path: Path, runtime: str, precision: str, channels: int, channels_last: bool
) -> None:
    model, predictor, artifact_dir = build(tmp_path, runtime, precision, channels, channels_last=channels_last)
    assert (predictor.runtime, predictor.precision, predictor.device) == (runtime, precision, torch.device("cpu"))
    check_outputs(model, predictor, artifact_dir, precision, channels)
    manifest = read_manifest(artifact_dir)
    assert (manifest.runtime, manifest.input_shape, manifest.max_batch_size) == (runtime, [channels, SIZE, SIZE], 8)
    assert manifest.files and {"torch", "onnxruntime"} <= set(manifest.versions)
    assert all(p.dtype == torch.float32 for p in model.parameters()), "the input model was changed"


@pytest.mark.slow
@pytest.mark.parametrize(
    "precision,channels,kernel",
    [
        ("fp32", 3, "mkldnn"),
        ("int8", 1, "qconv"),
        ("bf16", 3, None),
        ("fp16", 1, None),
    ],
)
def test_inductor_builds_reload_and_use_frozen_kernels(
    tmp_path: Path, precision: str, channels: int, kernel: str | None
) -> None:
    model, predictor, artifact_dir = build(tmp_path, "inductor", precision, channels)
    check_outputs(model, predictor, artifact_dir, precision, channels)
    manifest = read_manifest(artifact_dir)
    assert "avx2" in manifest.cpu_isa or not current_cpu_isa()
    if precision == "int8":
        assert manifest.quantization and manifest.quantization["compiled_vs_preview_sqnr_db"] > 30
        assert manifest.quantization["always_float"] == ["stem.0"]  # the single-input-channel conv
    if kernel is not None:
        # NOTE: freezing is what turns convolutions into prepacked oneDNN (int8) kernels; when it is
        # silently off (grad enabled), int8 runs as dequantize + float conv and is no faster.
        with zipfile.ZipFile(artifact_dir / "model_aoti.pt2") as package:
            wrappers = [n for n in package.namelist() if n.endswith("wrapper.cpp")]
            assert kernel in package.read(wrappers[0]).decode()


def test_static_batch_of_one(tmp_path: Path) -> None:
    model = make_model(3)
    predictor = build_predictor(model, RealizationConfig(), make_ctx(model, 3), tmp_path / "b1", max_batch_size=1)
    assert load_predictor(tmp_path / "b1")(torch.randn(1, 3, SIZE, SIZE)).shape == (1, CLASSES)
    with pytest.raises(ValueError, match="outside 1..1"):
        predictor(torch.randn(2, 3, SIZE, SIZE))


@pytest.mark.parametrize(
    "bad",
    [
        torch.randn(MAX_BATCH + 1, 3, SIZE, SIZE),
        torch.randn(0, 3, SIZE, SIZE),
        torch.randn(2, 1, SIZE, SIZE),
        torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64),
        torch.randn(3, SIZE, SIZE),
    ],
)
def test_predictor_rejects_bad_batches(bad: torch.Tensor) -> None:
    predictor = EagerPredictor(
        make_model(3),
        precision="fp32",
        device=torch.device("cpu"),
        input_shape=(3, SIZE, SIZE),
        max_batch_size=MAX_BATCH,
    )
    with pytest.raises(ValueError):
        predictor(bad)


# --- artifact integrity ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eager_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("eager"), "eager", "fp32")[2]


def test_tampered_file_fails_to_load(eager_artifact: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(eager_artifact, tmp_path / "copy"))
    data = bytearray((copy / "model.pt2").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.pt2").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        load_predictor(copy)
    (copy / "model.pt2").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_predictor(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not a valid manifest"):
        load_predictor(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="not a built artifact"):
        load_predictor(copy)


def test_incompatible_artifacts_are_refused(eager_artifact: Path) -> None:
    manifest = read_manifest(eager_artifact)
    with pytest.raises(ArtifactError, match="built for cpu"):
        check_compatible(manifest, torch.device("meta"), compiled=False)
    manifest.versions["torch"] = "1.0.0"
    with pytest.raises(ArtifactError, match="torch 1.0.0"):
        check_compatible(manifest, torch.device("cpu"), compiled=True)
    manifest.versions["torch"] = torch.__version__
    missing = [flag for flag in _ISA_FLAGS if flag not in current_cpu_isa()]
    if missing and current_cpu_isa():
        manifest.cpu_isa.append(missing[-1])
        with pytest.raises(ArtifactError, match=missing[-1]):
            check_compatible(manifest, torch.device("cpu"), compiled=True)
        check_compatible(manifest, torch.device("cpu"), compiled=False)  # eager code dispatches at run time


# --- int8 sensitivity-guided fallback -------------------------------------------------------------


class OutlierNet(nn.Module):
    """conv1 makes one huge channel that conv2 ignores: quantizing the tensor between them (per-tensor)
    rounds every other channel to zero, so only keeping that tensor in float recovers the output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2, self.conv3 = (nn.Conv2d(c, 8, 3, padding=1) for c in (3, 8, 8))
        self.fc = nn.Linear(8, CLASSES)
        with torch.no_grad():
            self.conv1.weight[0] *= 1000
            self.conv2.weight[:, 0] = 0
            for layer in (self.conv1, self.conv2, self.conv3, self.fc):
                layer.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


def build_outlier(tmp_path: Path, runtime: str, max_score_drop: float, max_fallback_layers: int = 4):  # type: ignore[no-untyped-def]
    model = OutlierNet().eval()
    validation = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(validation)

    def score(predictor: Predictor) -> float:
        """Minus the error energy relative to the logits' variance (0 is perfect)."""
        out = torch.cat([predictor(validation[i : i + MAX_BATCH]) for i in range(0, 32, MAX_BATCH)])
        return -float(((out - expected) ** 2).mean() / ((expected - expected.mean(0)) ** 2).mean())

    ctx = CompressionContext(
        calibration_inputs=torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(3)),
        example_inputs=validation[:4],
        teacher=model,
    )
    config = RealizationConfig(
        runtime=runtime, precision="int8", calibration_batches=2, max_fallback_layers=max_fallback_layers
    )
    predictor = build_predictor(
        model, config, ctx, tmp_path / runtime, max_batch_size=MAX_BATCH, score_fn=score, max_score_drop=max_score_drop
    )
    return read_manifest(tmp_path / runtime), score, predictor


def test_onnx_int8_fallback_keeps_sensitive_layers_in_float(tmp_path: Path) -> None:
    manifest, score, predictor = build_outlier(tmp_path, "onnxruntime", max_score_drop=0.2)
    fallback = manifest.fallback
    assert fallback is not None and fallback["int8_score"] < -1.0, "the fully int8 model should fail"
    # NOTE: ONNX Runtime quantizes conv1's output as well as conv2's input: both must stay float.
    assert set(fallback["float_layer_modules"]) == {"conv1", "conv2"}
    assert len(manifest.float_layers) == 2 and fallback["within_budget"]
    assert fallback["final_score"] == pytest.approx(score(load_predictor(tmp_path / "onnxruntime")))
    assert fallback["final_score"] == pytest.approx(score(predictor))


def test_onnx_int8_fallback_respects_layer_limit_and_budget(tmp_path: Path) -> None:
    limited, _, _ = build_outlier(tmp_path / "limited", "onnxruntime", max_score_drop=0.2, max_fallback_layers=1)
    assert len(limited.float_layers) == 1 and limited.fallback and not limited.fallback["within_budget"]
    lenient, _, _ = build_outlier(tmp_path / "lenient", "onnxruntime", max_score_drop=1e6)
    assert lenient.float_layers == [] and lenient.fallback and lenient.fallback["sensitivity"] == {}


@pytest.mark.slow
def test_inductor_int8_fallback_uses_module_names(tmp_path: Path) -> None:
    manifest, _, _ = build_outlier(tmp_path, "inductor", max_score_drop=0.2)
    assert manifest.float_layers == ["conv2"]
    assert manifest.fallback and manifest.fallback["within_budget"]


def test_inductor_cache_dir_is_scoped(tmp_path: Path) -> None:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    from compression.runtimes.common import inductor_cache_dir

    before = cache_dir()
    with inductor_cache_dir(tmp_path / "inductor"):
        assert cache_dir() == str(tmp_path / "inductor")
    assert cache_dir() == before


def test_inductor_cache_dir_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative cache dir is made absolute: AOTInductor's CUDA wrapper compile runs g++ elsewhere."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    from compression.runtimes.common import inductor_cache_dir

    monkeypatch.chdir(tmp_path)
    with inductor_cache_dir(Path("cache") / "inductor"):
        assert cache_dir() == str(tmp_path.resolve() / "cache" / "inductor")


# --- latency --------------------------------------------------------------------------------------


class Recording:
    """A real predictor that also records the order of calls."""

    def __init__(self, name: str, inner: EagerPredictor, calls: list[str]) -> None:
        self.name, self.inner, self.calls = name, inner, calls
        self.runtime, self.precision, self.device = inner.runtime, inner.precision, inner.device
        self.max_batch_size = inner.max_batch_size

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls.append(self.name)
        return self.inner(batch)


def eager(model: nn.Module, channels: int = 3) -> EagerPredictor:
    return EagerPredictor(
        model.eval(),
        precision="fp32",
        device=torch.device("cpu"),
        input_shape=(channels, SIZE, SIZE),
        max_batch_size=MAX_BATCH,
    )


def test_latency_is_interleaved_and_ordered() -> None:
    heavy = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), *[nn.Conv2d(32, 32, 3, padding=1) for _ in range(3)])
    calls: list[str] = []
    predictors = {
        "light": Recording("light", eager(nn.Conv2d(3, 4, 1)), calls),
        "heavy": Recording("heavy", eager(heavy), calls),
        "small": Recording("small", eager(make_model(3)), calls),
    }
    stats = measure_latency(predictors, torch.randn(2, 3, SIZE, SIZE), warmup=2, iterations=9)
    assert set(stats) == set(predictors)
    timed = calls[2 * 3 :]
    assert len(timed) == 27 and all(sorted(timed[i : i + 3]) == ["heavy", "light", "small"] for i in range(0, 27, 3))
    for s in stats.values():
        assert len(s.samples) == 9 and 0 < min(s.samples) <= s.p50_ms <= s.p95_ms <= max(s.samples)
    # NOTE: ~2000x the MACs of "light": far beyond the noise of a shared machine.
    assert stats["heavy"].p50_ms > stats["light"].p50_ms


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(min_value=0.001, max_value=1e4), min_size=1, max_size=200))
def test_latency_percentiles_match_numpy(samples: list[float]) -> None:
    stats = LatencyStats.from_samples(samples)
    assert stats.p50_ms == pytest.approx(float(np.percentile(samples, 50)))
    assert stats.p95_ms == pytest.approx(float(np.percentile(samples, 95)))
    assert stats.mean_ms == pytest.approx(float(np.mean(samples)))


def test_latency_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="no predictors"):
        measure_latency({}, torch.randn(1, 3, SIZE, SIZE), warmup=0, iterations=1)
    with pytest.raises(ValueError, match="iterations"):
        measure_latency({"a": eager(nn.Conv2d(3, 4, 1))}, torch.randn(1, 3, SIZE, SIZE), warmup=0, iterations=0)


# --- CUDA -----------------------------------------------------------------------------------------


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_eager_half_precision(tmp_path: Path, precision: str) -> None:
    model, predictor, artifact_dir = build(tmp_path, "eager", precision, 3, device="cuda", channels_last=True)
    assert predictor.device.type == "cuda"
    check_outputs(model, predictor, artifact_dir, precision, 3, device="cuda")
    stats = measure_latency({"p": predictor}, torch.randn(MAX_BATCH, 3, SIZE, SIZE), warmup=2, iterations=5)
    assert 0 < stats["p"].p50_ms <= stats["p"].p95_ms


@pytest.mark.gpu
@pytest.mark.slow
@cuda
def test_cuda_inductor_fp16(tmp_path: Path) -> None:
    model, predictor, artifact_dir = build(tmp_path, "inductor", "fp16", 3, device="cuda")
    check_outputs(model, predictor, artifact_dir, "fp16", 3, device="cuda")


def test_pt2e_layer_names_survive_fx_models() -> None:
    """Strict export of an fx GraphModule (what fx BN folding returns) records getattr(...) paths;
    float layers must still be found by their module names, and unknown names must be refused."""
    from compression.runtimes.inductor import PT2EInt8Builder

    model = torch.fx.symbolic_trace(make_model(1))
    calibration = [torch.randn(4, 1, SIZE, SIZE) for _ in range(2)]
    builder = PT2EInt8Builder(model, torch.randn(2, 1, SIZE, SIZE), calibration, MAX_BATCH)
    assert builder.quantization["always_float"] == ["stem.0"]
    assert builder.layers() == ["dw", "pw", "down", "fc"]
    x = torch.randn(3, 1, SIZE, SIZE)
    full, no_pw = builder.variant([])(x), builder.variant(["pw"])(x)
    all_float = builder.variant(builder.layers())(x)
    with torch.no_grad():
        expected = model(x)
    # NOTE: one layer in float need not raise the end-to-end SQNR (int8 errors of several layers can partly
    # cancel: on an AVX-512 VNNI host "pw" in float gave 47.85 dB against 47.96 all int8), so the test asks
    # that the named layer was found (the output changes) and that every layer in float is far closer.
    assert not torch.equal(no_pw, full)
    assert sqnr_db(expected, full) > MIN_SQNR["int8"]
    assert sqnr_db(expected, all_float) > sqnr_db(expected, full) + 20
    with pytest.raises(ValueError, match="not in the exported graph"):
        builder.variant(["features.9"])


def test_build_rejects_inconsistent_arguments(tmp_path: Path) -> None:
    model = make_model(3)
    with pytest.raises(ValueError, match="go together"):
        build_predictor(
            model,
            RealizationConfig(runtime="onnxruntime", precision="int8"),
            make_ctx(model, 3),
            tmp_path,
            max_batch_size=MAX_BATCH,
            score_fn=lambda predictor: 0.0,
        )
    with pytest.raises(ValueError, match="max_batch_size"):
        build_predictor(model, RealizationConfig(), make_ctx(model, 3), tmp_path, max_batch_size=0)
