"""Start-up compression while serving: the original answers first, then the chosen variant, no failures."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tritonclient.grpc as triton

from compression.models.digits.data import load_splits, normalize
from tests.compressed_digits import CHOSEN, digits_config, seed_trained_digits
from tests.serving import running_server, sample_value, scrape

pytestmark = pytest.mark.slow


def test_requests_during_startup_compression_all_succeed(tmp_path: Path) -> None:
    split = load_splits()["test"]
    images, labels = normalize(split.images[:40]), split.labels[:40]
    seed_trained_digits(tmp_path)
    with running_server(digits_config(tmp_path)) as server:
        client = triton.InferenceServerClient(server.address)

        def one(i: int) -> tuple[str, bool]:
            tensor = triton.InferInput("input", [1, 1, 28, 28], "FP32")
            tensor.set_data_from_numpy(images[i % 40 : i % 40 + 1])
            result = client.infer("digits", [tensor])
            return result.get_response().model_version, bool(result.as_numpy("logits").argmax() == labels[i % 40])

        answered: list[tuple[str, bool]] = []
        deadline = time.monotonic() + 600
        with ThreadPoolExecutor(max_workers=4) as pool:
            search_over = False
            while time.monotonic() < deadline:
                answered.extend(pool.map(one, range(len(answered), len(answered) + 8)))
                if answered[-1][0] == CHOSEN and sum(v == CHOSEN for v, _ in answered) >= 16:
                    break
                if search_over:
                    break  # the search ended a round ago and nothing swapped: fail below, don't wait it out
                search_over = not server.server.compressed.searching
                time.sleep(0.05)
        versions = [v for v, _ in answered]
        assert versions[0] == "original" and versions[-1] == CHOSEN, versions[-3:]
        first_swapped = versions.index(CHOSEN)
        assert set(versions[first_swapped + 8 :]) <= {CHOSEN}  # once swapped, the default stays swapped
        assert sum(ok for _, ok in answered) >= 0.95 * len(answered)

        # both variants stay addressable, and the config describes the chosen one
        tensor = triton.InferInput("input", [1, 1, 28, 28], "FP32")
        tensor.set_data_from_numpy(images[:1])
        assert client.infer("digits", [tensor], model_version="original").get_response().model_version == "original"
        assert client.infer("digits", [tensor], model_version="compressed").get_response().model_version == CHOSEN
        parameters = client.get_model_config("digits", as_json=True)["config"]["parameters"]
        assert parameters["default_variant"]["string_value"] == CHOSEN
        assert parameters["techniques"]["string_value"] == "onnxruntime:int8"
        assert float(parameters["latency_p95_ms"]["string_value"]) > 0
        assert client.get_model_metadata("digits", as_json=True)["versions"] == ["1", "2"]
        assert parameters["version_2"]["string_value"] == CHOSEN
        assert client.infer("digits", [tensor], model_version="2").get_response().model_version == CHOSEN

        # deploy-time figures, one series per variant, next to the live metrics
        metrics = scrape(server)
        for variant in ("original", CHOSEN):
            for name in ("slimserve_deploy_latency_p50_seconds", "slimserve_deploy_latency_p95_seconds"):
                assert sample_value(metrics[name], name, variant=variant) > 0
            assert (
                sample_value(metrics["slimserve_deploy_top1_ratio"], "slimserve_deploy_top1_ratio", variant=variant)
                > 0.95
            )
            assert (
                sample_value(metrics["slimserve_deploy_size_bytes"], "slimserve_deploy_size_bytes", variant=variant) > 0
            )
        info = [s for s in metrics["slimserve_deploy_variant_info"] if s.labels.get("variant") == CHOSEN]
        assert info and info[0].labels["techniques"] == "onnxruntime:int8"
        active = metrics["slimserve_variant_active"]
        assert sample_value(active, "slimserve_variant_active", variant=CHOSEN) == 1
        assert sample_value(active, "slimserve_variant_active", variant="original") == 0
    # a restart finds the published result and serves it at once, without searching
    with running_server(digits_config(tmp_path)) as server:
        assert server.server.registry.get("digits").default_variant == CHOSEN
