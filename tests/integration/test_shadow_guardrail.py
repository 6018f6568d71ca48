"""Live shadow comparison and the guardrail, on a real server with real gRPC clients.

The "compressed" variants here are real digits networks put in place of a search result: an exact copy
(agreement must be 100%) and one whose output rows are scrambled (agreement ~10%), which the guardrail
must take out of service while every request keeps succeeding.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton

from clients import cli
from compression.models.digits.data import load_splits, normalize
from compression.models.digits.model import load_trained
from compression.models.names import ORIGINAL
from compression.runtimes.eager import EagerPredictor
from protos import admin_pb2, admin_pb2_grpc
from server.config.settings import DeployConfig, GuardrailSettings, ShadowSettings
from tests.conftest import digits_without_compression
from tests.serving import ServerThread, eventually, running_server, sample_value, scrape

IMAGES = 64


@pytest.fixture(scope="module")
def digits_images() -> tuple[np.ndarray, np.ndarray]:
    split = load_splits()["test"]
    return normalize(split.images[:IMAGES]), split.labels[:IMAGES]


def shadowed_config(shadow: ShadowSettings, guardrail: GuardrailSettings) -> DeployConfig:
    config = digits_without_compression()
    models = [m.model_copy(update={"shadow": shadow, "guardrail": guardrail}) for m in config.models]
    return config.model_copy(update={"models": models})


def digits_predictor(edit: Callable[[torch.nn.Module], None] = lambda module: None) -> EagerPredictor:
    module = copy.deepcopy(load_trained()).eval()
    edit(module)
    return EagerPredictor(
        module, precision="fp32", device=torch.device("cpu"), input_shape=(1, 28, 28), max_batch_size=32
    )


def scramble_classes(module: torch.nn.Module) -> None:
    """Rotate the classifier's output rows: the network now names the wrong digit for nearly every image."""
    with torch.no_grad():
        for tensor in (module.classifier.weight, module.classifier.bias):
            tensor.copy_(torch.roll(tensor, shifts=3, dims=0))


def promote(server: ServerThread, name: str, predictor: EagerPredictor) -> None:
    registry = server.server.registry
    model = registry.get("digits")

    async def install() -> None:
        registry.promote_compressed(model, name, predictor, {"techniques": "test fixture"})

    server.call(install())


def infer_one(client: triton.InferenceServerClient, image: np.ndarray) -> tuple[str, int]:
    tensor = triton.InferInput("input", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(image[None])
    result = client.infer("digits", [tensor])
    return result.get_response().model_version, int(result.as_numpy("logits").argmax())


def compared(server: ServerThread) -> tuple[float, float]:
    samples = scrape(server)["slimserve_shadow_comparisons"]
    name = "slimserve_shadow_comparisons_total"
    return sample_value(samples, name, result="agree"), sample_value(samples, name, result="disagree")


@pytest.fixture
def copy_server() -> Iterator[ServerThread]:
    config = shadowed_config(
        ShadowSettings(fraction=1.0, max_compute_share=1.0), GuardrailSettings(min_samples=10, window=50)
    )
    with running_server(config) as server:
        promote(server, "copy", digits_predictor())
        yield server


def test_every_sampled_request_is_compared_and_agrees(
    copy_server: ServerThread, digits_images: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = digits_images
    client = triton.InferenceServerClient(copy_server.address)
    answers = [infer_one(client, image) for image in images]
    assert {version for version, _ in answers} == {"copy"}
    assert np.mean([digit == label for (_, digit), label in zip(answers, labels)]) > 0.9

    eventually(lambda: sum(compared(copy_server)) == IMAGES)
    agree, disagree = compared(copy_server)
    assert (agree, disagree) == (IMAGES, 0)
    metrics = scrape(copy_server)
    divergence = metrics["slimserve_shadow_divergence"]
    labels_ = {"variant": "copy", "shadow_variant": ORIGINAL}
    assert sample_value(divergence, "slimserve_shadow_divergence_count", **labels_) == IMAGES
    assert sample_value(divergence, "slimserve_shadow_divergence_sum", **labels_) < 1e-6
    assert (
        sample_value(
            metrics["slimserve_guardrail_window_agreement_ratio"], "slimserve_guardrail_window_agreement_ratio"
        )
        == 1
    )
    assert sample_value(metrics["slimserve_guardrail_rollbacks"], "slimserve_guardrail_rollbacks_total") == 0
    info = {s.labels["variant"]: s.labels for s in metrics["slimserve_variant_info"]}
    assert (info["original"]["version"], info["copy"]["version"], info["copy"]["device"]) == ("1", "2", "cpu")


def test_samples_beyond_the_queue_are_dropped_and_counted_never_lost(
    digits_images: tuple[np.ndarray, np.ndarray],
) -> None:
    images, _ = digits_images
    config = shadowed_config(
        ShadowSettings(fraction=1.0, max_pending=2, max_batch_size=1, max_compute_share=1.0), GuardrailSettings()
    )
    with running_server(config) as server:
        promote(server, "copy", digits_predictor())
        client = triton.InferenceServerClient(server.address)
        requests = 8 * IMAGES
        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(lambda i: infer_one(client, images[i % IMAGES]), range(requests)))
        assert len(answers) == requests  # every caller was answered

        def accounted() -> float:
            dropped = scrape(server)["slimserve_shadow_dropped"]
            return sum(compared(server)) + sample_value(dropped, "slimserve_shadow_dropped_total", reason="busy")

        eventually(lambda: accounted() == requests)
        assert compared(server)[1] == 0


def test_guardrail_rolls_back_a_broken_variant_without_failing_requests(
    digits_images: tuple[np.ndarray, np.ndarray],
) -> None:
    images, labels = digits_images
    guardrail = GuardrailSettings(min_agreement=0.9, window=40, min_samples=20)
    with running_server(shadowed_config(ShadowSettings(fraction=1.0, max_compute_share=1.0), guardrail)) as server:
        promote(server, "scrambled", digits_predictor(scramble_classes))
        client = triton.InferenceServerClient(server.address)
        answers: list[tuple[str, int, int]] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not answers or answers[-1][0] != ORIGINAL):
            i = len(answers) % IMAGES
            answers.append((*infer_one(client, images[i]), int(labels[i])))
        versions = [version for version, _, _ in answers]
        assert versions[0] == "scrambled" and versions[-1] == ORIGINAL, versions[-5:]
        broken = [(digit, label) for version, digit, label in answers if version == "scrambled"]
        assert np.mean([digit == label for digit, label in broken]) < 0.3  # the fixture really is broken
        # it was caught as soon as the window had its minimum sample, not later
        agree, disagree = compared(server)
        assert guardrail.min_samples <= agree + disagree <= len(broken) + 1

        # after the rollback the original answers correctly, and the scrambled variant is still compared
        after = [infer_one(client, images[i]) for i in range(IMAGES)]
        assert {version for version, _ in after} == {ORIGINAL}
        assert np.mean([digit == label for (_, digit), label in zip(after, labels)]) > 0.9
        metrics = scrape(server)
        rollbacks = metrics["slimserve_guardrail_rollbacks"]
        assert sample_value(rollbacks, "slimserve_guardrail_rollbacks_total", variant="scrambled") == 1
        active = metrics["slimserve_variant_active"]
        assert sample_value(active, "slimserve_variant_active", variant=ORIGINAL) == 1
        assert sample_value(active, "slimserve_variant_active", variant="scrambled") == 0

        # the operator overrides: pin the broken variant; the guardrail leaves it alone
        with grpc.insecure_channel(server.address) as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            state = admin.GetVariant(admin_pb2.GetVariantRequest(model_name="digits"))
            assert state.default_variant == ORIGINAL and state.rollbacks == 1
            assert "below guardrail.min_agreement 0.9" in state.last_rollback_reason
            state = admin.SetVariant(admin_pb2.SetVariantRequest(model_name="digits", variant="compressed", pin=True))
            assert (state.default_variant, state.pinned) == ("scrambled", True)
            pinned = [infer_one(client, images[i % IMAGES]) for i in range(3 * guardrail.window)]
            assert {version for version, _ in pinned} == {"scrambled"}
            state = admin.SetVariant(admin_pb2.SetVariantRequest(model_name="digits", variant="", pin=False))
            assert (state.default_variant, state.pinned, state.rollbacks) == ("scrambled", False, 1)
            # unpinned, it is rolled back again: by the comparisons still queued from the pinned requests, or by
            # the next ones (polling with requests, so neither order of the two can stall the test)
            eventually(lambda: infer_one(client, images[0])[0] == ORIGINAL)
            assert admin.GetVariant(admin_pb2.GetVariantRequest(model_name="digits")).rollbacks == 2

            with pytest.raises(grpc.RpcError) as error:
                admin.SetVariant(admin_pb2.SetVariantRequest(model_name="digits", variant="nonesuch"))
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as error:
                admin.GetVariant(admin_pb2.GetVariantRequest(model_name="nonesuch"))
            assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_cli_shows_and_overrides_the_default_variant(copy_server: ServerThread, capsys: pytest.CaptureFixture) -> None:
    address = ["--address", copy_server.address]
    assert cli.main(["variant", *address]) == 0
    assert "default variant copy (guardrail active)" in capsys.readouterr().out
    assert cli.main(["variant", *address, "--set", "original", "--pin"]) == 0
    assert "default variant original (pinned)" in capsys.readouterr().out
    assert copy_server.server.registry.get("digits").default_variant == ORIGINAL
    assert cli.main(["variant", *address, "--unpin"]) == 0
    assert "default variant original (guardrail active)" in capsys.readouterr().out
    assert cli.main(["variant", *address, "--set", "nonesuch"]) == 1
    assert "error: NOT_FOUND: model 'digits' has no version 'nonesuch'" in capsys.readouterr().err
