"""The adaptive serving policy on a real server: the original answers while the latency objective holds,
the compressed variant takes over under load within a second, the original returns when the load drops,
and no request fails on the way.

The original is ``SleepyNet`` (20 ms per forward pass, one row per batch), so its queue makes the
objective visible on any machine; its compressed variant is its exported graph, which has no sleep.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from compression.models.settings import PreprocessingSettings, PythonSource
from compression.search.settings import CompressionSettings
from server.config.settings import DeployConfig, ModelSettings, ServingSettings
from tests.compressed_digits import seed_trained_digits
from tests.serving import eventually, running_server, sample_value, scrape

pytestmark = pytest.mark.slow

MODEL = "sleepy"
SLO_MS = 100.0


def sleepy_config(cache_dir: Path) -> DeployConfig:
    compression = CompressionSettings.model_validate(
        {
            "budget": {"max_accuracy_drop": None, "min_agreement": 0.99},
            "data": {"calibration_size": 64, "validation_size": 64},
            "measurement": {"warmup": 2, "iterations": 10},
            "candidates": [{"name": "exported", "realization": {"runtime": "eager", "precision": "fp32"}}],
        }
    )
    model = ModelSettings(
        name=MODEL,
        source=PythonSource(format="python", factory="tests.models:SleepyNet", kwargs={"delay_s": 0.02}),
        labels=[str(i) for i in range(10)],
        preprocessing=PreprocessingSettings(channels=1, resize=28, crop=28, mean=(0.5,), std=(0.5,)),
        batching={"max_batch_size": 1},  # type: ignore[arg-type]
        compression=compression,
        serving=ServingSettings(policy="adaptive", slo_p95_ms=SLO_MS, min_hold_s=0.5),
    )
    return DeployConfig(models=[model], cache_dir=cache_dir)


def answer(client: triton.InferenceServerClient, version: str = "") -> str:
    tensor = triton.InferInput("input", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32))
    return client.infer(MODEL, [tensor], model_version=version).get_response().model_version


def test_adaptive_policy_follows_the_load(tmp_path: Path) -> None:
    seed_trained_digits(tmp_path)  # the builtin calibration data are the digits images
    with running_server(sleepy_config(tmp_path)) as server:
        client = triton.InferenceServerClient(server.address)
        model = server.server.registry.get(MODEL)
        eventually(lambda: "compressed" in model.aliases, timeout=300)

        idle = [answer(client) for _ in range(10)]
        assert set(idle) == {"original"}, idle
        assert answer(client, "compressed") == "exported"  # pinned requests keep their variant

        answered: list[tuple[float, str]] = []
        failures: list[str] = []
        stop = threading.Event()

        def hammer() -> None:
            own = triton.InferenceServerClient(server.address)
            while not stop.is_set():
                try:
                    answered.append((time.monotonic(), answer(own)))
                except InferenceServerException as exc:
                    failures.append(str(exc))

        threads = [threading.Thread(target=hammer) for _ in range(16)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        eventually(lambda: sum(v == "exported" for _, v in answered) >= 50, timeout=30)
        assert answer(client, "1") == "original"  # pinned to the original even under load
        time.sleep(1.0)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        first_compressed = min(t for t, v in answered if v == "exported")
        assert first_compressed - started < 1.0
        late = [v for t, v in answered if t > first_compressed + 0.5]
        assert late.count("exported") >= 0.8 * len(late)

        def original_is_back() -> bool:
            time.sleep(0.05)
            return answer(client) == "original"

        eventually(original_is_back, timeout=10)
        quiet = [answer(client) for _ in range(10)]
        assert quiet.count("original") >= 9, quiet
        assert failures == []
        metrics = scrape(server)
        decisions = metrics["slimserve_policy_decisions"]
        assert sample_value(decisions, "slimserve_policy_decisions_total", model=MODEL, reason="slo_risk") > 0
        assert sample_value(decisions, "slimserve_policy_decisions_total", model=MODEL, reason="slo_ok") > 0
        slo = metrics["slimserve_serving_slo_seconds"]
        assert sample_value(slo, "slimserve_serving_slo_seconds", model=MODEL) == SLO_MS / 1000


def test_guardrail_hold_overrides_the_policy(tmp_path: Path) -> None:
    seed_trained_digits(tmp_path)
    with running_server(sleepy_config(tmp_path)) as server:
        model = server.server.registry.get(MODEL)
        eventually(lambda: "compressed" in model.aliases, timeout=300)
        server.server.registry.set_default(model, "original")  # what a rollback does
        client = triton.InferenceServerClient(server.address)
        answered: list[str] = []
        stop = threading.Event()

        def hammer() -> None:
            own = triton.InferenceServerClient(server.address)
            while not stop.is_set():
                answered.append(answer(own))

        threads = [threading.Thread(target=hammer) for _ in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        assert set(answered) == {"original"}
        assert answer(client, "compressed") == "exported"
