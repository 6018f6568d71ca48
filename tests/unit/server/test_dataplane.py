"""The data plane on a real registry, dynamic batchers and decode pool with two tiny variants: model and
variant lookup, inference and classification (top-k, chunks of max_batch_size), the errors a caller sees,
the accounting of ``RequestTrack`` and ``status_for``, and the hand-off to the live shadow comparison."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client import CollectorRegistry
from torch import nn

from compression.models.images import ImagePreprocessor
from compression.models.names import INPUT_NAME, ORIGINAL
from compression.models.settings import BatchingSettings, BuiltinSource, PreprocessingSettings
from protos import grpc_service_pb2 as pb
from protos.errors import InvalidArgument, NotFound, ServingError
from protos.tensors import softmax
from server.config.settings import ModelSettings, ShadowSettings
from server.dataplane import DataPlane, status_for
from server.observability.metrics import ServerMetrics
from server.transport.kserve_codec import parse_inputs
from server.variants.guardrail import Guardrail
from server.variants.registry import ModelRegistry, ServedModel
from server.variants.shadow import ShadowComparer

PRE = PreprocessingSettings(channels=1, resize=8, crop=8, mean=(0.5,), std=(0.5,))
LABELS = ["cat", "dog", "eel", "fox"]
CHAIN = "pruned-tiny"


def tiny_net(seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 4)).eval()


ORIGINAL_NET, COMPRESSED_NET = tiny_net(0), tiny_net(1)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def run(scenario, *, compressed: bool = True):  # type: ignore[no-untyped-def]
    """Run ``scenario(plane)`` on a fresh loop; the model serves the original and (by default) a compressed
    variant that is its default. Max batch 4, at most 6 images per Classify."""

    async def main():  # type: ignore[no-untyped-def]
        with ThreadPoolExecutor(1) as inference, ThreadPoolExecutor(2) as decode:
            metrics = ServerMetrics(CollectorRegistry())
            registry = ModelRegistry(metrics, inference)
            settings = ModelSettings(
                name="tiny",
                source=BuiltinSource(),
                labels=LABELS,
                preprocessing=PRE,
                batching=BatchingSettings(max_batch_size=4),
                max_images_per_request=6,
                shadow=ShadowSettings(fraction=1.0, max_compute_share=1.0),
            )
            model = ServedModel(settings, LABELS, (1, 8, 8), 4, ImagePreprocessor(PRE, 10_000))
            registry.add_model(model)
            registry.add_variant(model, ORIGINAL, ORIGINAL_NET)
            if compressed:
                registry.promote_compressed(model, CHAIN, COMPRESSED_NET)
            try:
                return await scenario(DataPlane(registry, metrics, decode))
            finally:
                await registry.stop()

    return asyncio.run(main())


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 1, 8, 8)).astype(np.float32)


def expected(net: nn.Module, inputs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(inputs)).numpy()


def test_versions_resolve_to_the_default_by_number_by_name_and_by_alias() -> None:
    async def scenario(plane: DataPlane) -> dict[str, str]:
        found = {}
        for version in ("", "1", "2", ORIGINAL, CHAIN, "compressed"):
            track = plane.track("Infer")
            model, variant = plane.resolve("tiny", version, track)
            assert track.model == model.name and track.variant is variant
            track.finish(grpc.StatusCode.OK)
            found[version] = variant.name
        return found

    found = run(scenario)
    assert found == {"": CHAIN, "1": ORIGINAL, "2": CHAIN, ORIGINAL: ORIGINAL, CHAIN: CHAIN, "compressed": CHAIN}


def test_without_a_compressed_variant_the_default_is_the_original_and_version_2_is_unknown() -> None:
    async def scenario(plane: DataPlane) -> None:
        assert plane.resolve("tiny", "", plane.track("Infer"))[1].name == ORIGINAL
        with pytest.raises(NotFound, match="has no version '2'; use '' for the default, '1' or 'original'"):
            plane.resolve("tiny", "2", plane.track("Infer"))

    run(scenario, compressed=False)


def test_unknown_model_is_not_found_naming_the_served_models() -> None:
    async def scenario(plane: DataPlane) -> None:
        track = plane.track("Infer")
        with pytest.raises(NotFound) as error:
            plane.resolve("digits", "", track)
        assert status_for(error.value) == (
            grpc.StatusCode.NOT_FOUND,
            "unknown model 'digits'; this server serves: tiny",
        )
        assert track.variant is None and plane.active_requests == 1
        track.finish(error.value.code)
        assert plane.active_requests == 0

    run(scenario)


def test_infer_answers_with_the_resolved_variants_model_and_records_the_success() -> None:
    inputs = rows(3)

    async def scenario(plane: DataPlane) -> tuple[np.ndarray, np.ndarray, int, int]:
        outputs = []
        for version in ("", ORIGINAL):
            track = plane.track("Infer")
            _, variant = plane.resolve("tiny", version, track)
            outputs.append(await plane.infer(variant, inputs, track))
            assert track.result is not None and track.result.batch_size == 3
            track.finish(grpc.StatusCode.OK)
        stats = plane.registry.get("tiny").resolve("").stats
        return outputs[0], outputs[1], stats.success.count, stats.inference_count

    compressed, original, successes, inferred = run(scenario)
    np.testing.assert_allclose(compressed, expected(COMPRESSED_NET, inputs), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(original, expected(ORIGINAL_NET, inputs), rtol=1e-5, atol=1e-6)
    assert successes == 1 and inferred == 3


def test_bad_requests_are_invalid_argument_and_counted_as_failures() -> None:
    async def scenario(plane: DataPlane) -> int:
        track = plane.track("Infer")
        model, variant = plane.resolve("tiny", "", track)
        with pytest.raises(InvalidArgument, match=r"batch size 5 is outside 1\.\.4"):
            await plane.infer(variant, rows(5), track)
        track.finish(grpc.StatusCode.INVALID_ARGUMENT)
        for shape, datatype, message in (([1, 1, 8, 9], "FP32", "has shape"), ([1, 1, 8, 8], "INT8", "must be FP32")):
            request = pb.ModelInferRequest(model_name="tiny")
            request.inputs.add(name=INPUT_NAME, datatype=datatype, shape=shape)
            request.raw_input_contents.append(b"\0" * 4 * int(np.prod(shape)))
            with pytest.raises(InvalidArgument, match=message):
                parse_inputs(request, model)
        return variant.stats.fail.count

    assert run(scenario) == 1


def test_classify_returns_top_k_per_image_in_order_across_batches() -> None:
    images = [np.full((8, 8), 30 * i, np.uint8) for i in range(6)]  # 6 images, max batch 4: two chunks
    preprocess = ImagePreprocessor(PRE, 10_000)
    scores = softmax(expected(COMPRESSED_NET, np.stack([preprocess(png(i)) for i in images])))

    async def scenario(plane: DataPlane) -> tuple[list, list, list[int]]:
        model, variant = plane.resolve("tiny", "", plane.track("Classify"))
        top2 = await plane.classify(model, variant, [png(i) for i in images], 2, plane.track("Classify"))
        default = await plane.classify(model, variant, [png(images[0])], 0, plane.track("Classify"))
        return top2, default, sorted(variant.stats.batches)

    top2, default, batch_sizes = run(scenario)
    assert batch_sizes == [1, 2, 4]  # 6 images ran as chunks of at most max_batch_size
    assert len(top2) == 6 and all(len(image.classes) == 2 for image in top2)
    for image, row in zip(top2, scores):
        best = np.argsort(-row)[:2]
        assert [index for _, index, _ in image.classes] == best.tolist()
        assert [label for label, _, _ in image.classes] == [LABELS[i] for i in best]
        np.testing.assert_allclose([score for _, _, score in image.classes], row[best], rtol=1e-5)
    assert len(default[0].classes) == 4  # top_k 0 = the default (5), capped at the model's 4 classes
    assert sum(score for _, _, score in default[0].classes) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([], "no images in the request"),
        ([b"x"] * 7, "7 images in one request; the limit is 6"),
        ([png(np.zeros((8, 8))), b"\x89PNG\r\n\x1a\n broken"], "image 1 is a corrupt PNG image"),
    ],
)
def test_classify_rejects_bad_image_lists(images: list[bytes], message: str) -> None:
    async def scenario(plane: DataPlane) -> None:
        model, variant = plane.resolve("tiny", "", plane.track("Classify"))
        with pytest.raises(InvalidArgument, match=message):
            await plane.classify(model, variant, images, 1, plane.track("Classify"))

    run(scenario)


def test_status_for_reports_serving_errors_cancellation_and_unexpected_errors(caplog: pytest.LogCaptureFixture) -> None:
    assert status_for(ServingError("later", code=grpc.StatusCode.UNAVAILABLE)) == (grpc.StatusCode.UNAVAILABLE, "later")
    assert status_for(asyncio.CancelledError()) == (grpc.StatusCode.CANCELLED, "request cancelled")
    with caplog.at_level(logging.ERROR, logger="slimserve.dataplane"):
        assert status_for(KeyError("w")) == (grpc.StatusCode.INTERNAL, "internal error: KeyError: 'w'")
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [KeyError]


def test_answered_rows_are_offered_to_the_models_shadow_comparison() -> None:
    async def scenario(plane: DataPlane) -> tuple[int, float | None]:
        model = plane.registry.get("tiny")
        metrics = plane.metrics.shadow
        guardrail = Guardrail(model, model.settings.guardrail, plane.registry, metrics)
        with ThreadPoolExecutor(1) as pool:
            shadow = ShadowComparer(model, model.settings.shadow, guardrail, metrics, pool)
            plane.shadows[model.name] = shadow
            shadow.start()
            track = plane.track("Infer")
            _, variant = plane.resolve("tiny", "", track)
            await plane.infer(variant, rows(3), track)
            deadline = time.monotonic() + 30
            while guardrail.state().window_samples < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await shadow.stop()
        return guardrail.state().window_samples, guardrail.window_agreement

    samples, agreement = run(scenario)
    expected_agreement = expected(COMPRESSED_NET, rows(3)).argmax(1) == expected(ORIGINAL_NET, rows(3)).argmax(1)
    assert samples == 3 and agreement == pytest.approx(expected_agreement.mean())
