"""The registry (versions "1"/"2", aliases, the atomic default switch, stopping) and ``CompressedVariants``
picking a real cached search result (a tiny model compressed by the real pipeline) and hot-swapping it in."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from compression.context import CompressionContext
from compression.models.images import ImagePreprocessor
from compression.models.loading import LoadedModel
from compression.models.names import ORIGINAL
from compression.models.settings import BuiltinSource, PreprocessingSettings
from compression.search.pipeline import compress
from compression.search.settings import CompressionSettings
from compression.techniques.registry import apply, config_from_dict
from protos.errors import NotFound, Unavailable
from server.config.settings import DeployConfig, ModelSettings
from server.observability.metrics import ServerMetrics
from server.variants.compressed import CompressedVariants
from server.variants.registry import COMPRESSED_ALIAS, ModelRegistry, ServedModel

PRE = PreprocessingSettings(channels=1, resize=8, crop=8, mean=(0.5,), std=(0.5,))
LABELS = list("abcd")
with torch.random.fork_rng(devices=[]):
    torch.manual_seed(0)
    NET = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 4)).eval()
    OTHER = nn.Sequential(nn.Flatten(), nn.Linear(64, 4)).eval()
INPUTS = np.random.default_rng(0).normal(size=(3, 1, 8, 8)).astype(np.float32)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def settings(name: str = "tiny", compression: CompressionSettings | None = None) -> ModelSettings:
    return ModelSettings(name=name, source=BuiltinSource(), labels=LABELS, preprocessing=PRE, compression=compression)


def with_registry(scenario: Callable, model_settings: ModelSettings | None = None):  # type: ignore[no-untyped-def]
    """Run ``scenario(registry, model, metrics)`` on a fresh loop; the model serves only its original (NET)."""

    async def main():  # type: ignore[no-untyped-def]
        with ThreadPoolExecutor(1) as executor:
            metrics = ServerMetrics(CollectorRegistry())
            registry = ModelRegistry(metrics, executor)
            model = ServedModel(model_settings or settings(), LABELS, (1, 8, 8), 4, ImagePreprocessor(PRE, 10_000))
            registry.add_model(model)
            registry.add_variant(model, ORIGINAL, NET)
            try:
                return await scenario(registry, model, metrics)
            finally:
                await registry.stop()

    return asyncio.run(main())


async def answer(model: ServedModel, version: str) -> np.ndarray:
    return (await model.resolve(version).batcher.submit(INPUTS)).outputs


def active(metrics: ServerMetrics, variant: str) -> float | None:
    return metrics.registry.get_sample_value("slimserve_variant_active", {"model": "tiny", "variant": variant})


def test_promotion_numbers_versions_aliases_the_chain_and_switches_the_default() -> None:
    async def scenario(registry: ModelRegistry, model: ServedModel, metrics: ServerMetrics) -> None:
        assert model.resolve("").version == "1" and active(metrics, ORIGINAL) == 1
        variant = registry.promote_compressed(model, "int8-x", OTHER, {"techniques": "onnxruntime:int8"})
        assert variant.version == "2" and variant.properties == {"techniques": "onnxruntime:int8"}
        assert model.resolve("") is variant and model.resolve(COMPRESSED_ALIAS) is variant
        assert model.resolve("1").name == ORIGINAL and model.has_version("int8-x") and not model.has_version("3")
        assert (active(metrics, ORIGINAL), active(metrics, "int8-x")) == (0, 1)
        info = {"model": "tiny", "variant": "int8-x", "version": "2", "device": "cpu"}
        assert metrics.registry.get_sample_value("slimserve_variant_info", info) == 1
        np.testing.assert_allclose(await answer(model, ""), OTHER(torch.from_numpy(INPUTS)).detach(), atol=1e-6)
        batches = {"model": "tiny", "variant": "int8-x"}
        assert metrics.registry.get_sample_value("slimserve_inferences_total", batches) == 3
        assert variant.stats.execution_count == 1

    with_registry(scenario)


def test_a_request_queued_before_the_swap_finishes_on_the_old_default() -> None:
    async def scenario(registry: ModelRegistry, model: ServedModel, metrics: ServerMetrics) -> None:
        queued = asyncio.ensure_future(answer(model, ""))
        await asyncio.sleep(0)  # now waiting in the original's batcher
        registry.promote_compressed(model, "int8-x", OTHER)
        with torch.no_grad():
            np.testing.assert_allclose(await queued, NET(torch.from_numpy(INPUTS)), atol=1e-6)
            np.testing.assert_allclose(await answer(model, ""), OTHER(torch.from_numpy(INPUTS)), atol=1e-6)

    with_registry(scenario)


def test_set_default_to_an_unknown_variant_changes_nothing() -> None:
    async def scenario(registry: ModelRegistry, model: ServedModel, metrics: ServerMetrics) -> None:
        with pytest.raises(NotFound, match="no version 'int8-x'"):
            registry.set_default(model, "int8-x")
        assert model.default_variant == ORIGINAL and active(metrics, ORIGINAL) == 1

    with_registry(scenario)


def test_set_default_by_version_number_or_alias_keeps_the_default_resolvable() -> None:
    async def scenario(registry: ModelRegistry, model: ServedModel, metrics: ServerMetrics) -> None:
        registry.promote_compressed(model, "int8-x", OTHER)
        registry.set_default(model, "1")
        assert model.resolve("").name == ORIGINAL
        registry.set_default(model, COMPRESSED_ALIAS)
        assert model.resolve("").name == "int8-x"

    with_registry(scenario)


def test_stop_finishes_queued_work_then_refuses() -> None:
    async def scenario(registry: ModelRegistry, model: ServedModel, metrics: ServerMetrics) -> None:
        queued = asyncio.ensure_future(answer(model, ""))
        await asyncio.sleep(0)
        await registry.stop()
        assert (await queued).shape == (3, 4)
        with pytest.raises(Unavailable, match="shutting down"):
            await answer(model, "")

    with_registry(scenario)


# --- CompressedVariants: a cached search result comes into service -------------------------------------------


CLIP = {"technique": "weight_clip", "percentile": None, "k_std": 0.5}


def clipped(net: nn.Module) -> nn.Module:
    """What the candidate's technique makes of ``net`` (the real transform)."""
    return apply(net, config_from_dict(CLIP), CompressionContext(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), net))


CLIPPED = clipped(NET)


def search_settings(tmp: Path, steps: list) -> CompressionSettings:
    """A one-candidate search whose data is labelled by the clipped model, so that candidate is the most
    accurate variant by construction (no dependence on timings)."""
    images = torch.from_numpy(np.random.default_rng(1).normal(size=(120, 1, 8, 8)).astype(np.float32))
    with torch.no_grad():
        torch.save({"images": images, "labels": CLIPPED(images).argmax(1)}, tmp / "data.pt")
    return CompressionSettings.model_validate(
        {
            "budget": {"objective": "most_accurate", "max_accuracy_drop": 100},
            "data": {"source": "tensor_file", "path": tmp / "data.pt", "calibration_size": 64, "validation_size": 40},
            "measurement": {"warmup": 1, "iterations": 10},
            "candidates": [{"name": "clipped", "steps": steps, "realization": {"runtime": "eager"}}],
        }
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelSettings, ModelSettings]:
    """A cache holding two real search results: "tiny" chose its clipped candidate (an eager fp32 export);
    "plain" chose the original (its one candidate's technique fails on a model without BatchNorm)."""
    root = tmp_path_factory.mktemp("cache")
    loaded = LoadedModel(NET, LABELS, (1, 8, 8), 4, 0.0, None)
    chosen = settings("tiny", search_settings(root, [CLIP]))
    original = settings("plain", search_settings(root, [{"technique": "channel_prune", "importance": "bn_scale"}]))
    for model_settings in (chosen, original):
        compress(model_settings, loaded, root, progress=lambda line: None)
    return root, chosen, original


def attach(cache_dir: Path, model_settings: ModelSettings) -> tuple[ServedModel, list, bool, ServerMetrics]:
    warmed: list[tuple[tuple[int, int, int], int]] = []

    def warm_up(forward: Callable, input_shape: tuple[int, int, int], max_batch: int) -> None:
        forward(torch.zeros(max_batch, *input_shape))
        warmed.append((input_shape, max_batch))

    async def scenario(registry: ModelRegistry, model: ServedModel, metrics: ServerMetrics):  # type: ignore[no-untyped-def]
        with ThreadPoolExecutor(1) as pool:
            config = DeployConfig(models=[model_settings], cache_dir=cache_dir)
            variants = CompressedVariants(config, registry, metrics.deploy, pool, warm_up)
            await variants.attach(model, LoadedModel(NET, LABELS, (1, 8, 8), 4, 0.0, None))
            searching = variants.searching
            await variants.stop()
        if model.default_variant != ORIGINAL:
            with torch.no_grad():
                np.testing.assert_allclose(await answer(model, "2"), CLIPPED(torch.from_numpy(INPUTS)), atol=1e-5)
        return model, warmed, searching, metrics

    return with_registry(scenario, model_settings)


def test_a_cached_result_is_warmed_up_and_becomes_the_default_as_version_2(cache) -> None:  # type: ignore[no-untyped-def]
    root, chosen, _ = cache
    model, warmed, searching, metrics = attach(root, chosen)
    assert not searching and warmed == [((1, 8, 8), 32)]
    assert model.default_variant == "clipped" and [v.version for v in model.variants.values()] == ["1", "2"]
    variant = model.resolve(COMPRESSED_ALIAS)
    assert variant.properties["techniques"] == "weight_clip -> eager:fp32" and variant.properties["top1"] == "1.0"
    assert float(variant.properties["latency_p95_ms"]) > 0 and Path(variant.properties["report"]).is_file()
    assert "most accurate" in variant.properties["choice_reason"]
    top1 = {
        name: metrics.registry.get_sample_value("slimserve_deploy_top1_ratio", {"model": "tiny", "variant": name})
        for name in (ORIGINAL, "clipped")
    }
    assert top1["clipped"] == 1.0 and top1[ORIGINAL] is not None and top1[ORIGINAL] < 1.0


def test_a_result_that_chose_the_original_swaps_nothing(cache) -> None:  # type: ignore[no-untyped-def]
    root, _, original = cache
    model, warmed, searching, _ = attach(root, original)
    assert list(model.variants) == [ORIGINAL] and model.default_variant == ORIGINAL
    assert warmed == [] and not searching


def test_no_compression_block_means_no_variant_and_no_search(tmp_path: Path) -> None:
    disabled = settings("tiny", CompressionSettings(enabled=False))
    for model_settings in (settings("tiny"), disabled):
        model, warmed, searching, _ = attach(tmp_path, model_settings)
        assert list(model.variants) == [ORIGINAL] and warmed == [] and not searching
    assert not (tmp_path / "compressed").exists()
