"""The KServe v2 protocol against a real server, spoken by the stock Triton client."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from compression.models.digits.data import load_splits, normalize
from tests.serving import ServerThread

MODEL = "digits"


@pytest.fixture(scope="module")
def client(digits_server: ServerThread) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(digits_server.address)


@pytest.fixture(scope="module")
def test_split() -> tuple[np.ndarray, np.ndarray]:
    split = load_splits()["test"]
    return normalize(split.images), split.labels


def infer(
    client: triton.InferenceServerClient, batch: np.ndarray, outputs: list | None = None, **kwargs: object
) -> triton.InferResult:
    tensor = triton.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    return client.infer(MODEL, [tensor], outputs=outputs, **kwargs)


def test_health_and_server_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert not client.is_model_ready("no-such-model")
    metadata = client.get_server_metadata(as_json=True)
    assert metadata["name"] == "slimserve"
    assert {"classification", "statistics"} <= set(metadata["extensions"])


def test_model_metadata_and_config(client: triton.InferenceServerClient) -> None:
    metadata = client.get_model_metadata(MODEL, as_json=True)
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "1", "28", "28"]}]
    assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "10"]}]
    assert metadata["versions"] == ["1"]  # numeric, as perf_analyzer expects; "1" is the original
    config = client.get_model_config(MODEL, as_json=True)["config"]
    assert int(config["max_batch_size"]) >= 8
    assert config["input"][0]["dims"] == ["1", "28", "28"]
    assert config["output"][0]["dims"] == ["10"]
    assert "dynamic_batching" in config


def test_infer_held_out_digits_accuracy(client: triton.InferenceServerClient, test_split: tuple) -> None:
    images, labels = test_split
    predictions = []
    for start in range(0, len(images), 25):
        result = infer(client, images[start : start + 25], request_id=f"req-{start}")
        logits = result.as_numpy("logits")
        assert logits.shape == (min(25, len(images) - start), 10)
        assert result.get_response().id == f"req-{start}"
        predictions.append(logits.argmax(axis=1))
    accuracy = float((np.concatenate(predictions) == labels).mean())
    assert len(labels) == 500
    assert accuracy >= 0.97, f"top-1 on 500 held-out digits is {accuracy:.3f}"


def test_classification_extension_top3(client: triton.InferenceServerClient, test_split: tuple) -> None:
    images, labels = test_split
    batch = images[:4]
    raw = infer(client, batch).as_numpy("logits")
    output = triton.InferRequestedOutput("logits", class_count=3)
    result = infer(client, batch, outputs=[output])
    strings = result.as_numpy("logits")
    assert strings.shape == (4, 3)
    for row_logits, row in zip(raw, strings):
        parsed = [s.decode().split(":") for s in row]
        indices = [int(index) for _, index, _ in parsed]
        assert indices == list(np.argsort(-row_logits)[:3])
        assert [label for _, _, label in parsed] == [str(i) for i in indices]
        scores = [float(score) for score, _, _ in parsed]
        assert scores == sorted(scores, reverse=True)
        assert scores[0] == pytest.approx(float(row_logits.max()), abs=1e-4)


def test_pinned_original_version_answers(client: triton.InferenceServerClient, test_split: tuple) -> None:
    images, _ = test_split
    default = infer(client, images[:2]).as_numpy("logits")
    for version in ("original", "1"):
        result = infer(client, images[:2], model_version=version)
        assert result.get_response().model_version == "original"
        np.testing.assert_allclose(result.as_numpy("logits"), default, rtol=1e-5, atol=1e-5)


def test_stream_infer_answers_every_request(client: triton.InferenceServerClient, test_split: tuple) -> None:
    images, labels = test_split
    received: list = []
    client.start_stream(callback=lambda result, error: received.append((result, error)))
    try:
        for i in range(16):
            tensor = triton.InferInput("input", [1, 1, 28, 28], "FP32")
            tensor.set_data_from_numpy(images[i : i + 1])
            client.async_stream_infer(MODEL, [tensor], request_id=str(i))
        bad = triton.InferInput("input", [1, 1, 27, 27], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 1, 27, 27), np.float32))
        client.async_stream_infer(MODEL, [bad], request_id="bad")
    finally:
        client.stop_stream()  # waits for the responses
    assert len(received) == 17
    errors = [error for _, error in received if error is not None]
    assert len(errors) == 1 and "shape" in str(errors[0])
    answers = {r.get_response().id: r.as_numpy("logits").argmax() for r, e in received if e is None}
    assert sorted(answers, key=int) == [str(i) for i in range(16)]
    assert sum(answers[str(i)] == labels[i] for i in range(16)) >= 15


def test_statistics_count_inferences(client: triton.InferenceServerClient, test_split: tuple) -> None:
    before = client.get_inference_statistics(MODEL, as_json=True)["model_stats"]
    infer(client, test_split[0][:3])
    after = client.get_inference_statistics(MODEL, as_json=True)["model_stats"]
    original = lambda stats: next(s for s in stats if s["version"] == "1")  # noqa: E731
    assert int(original(after).get("inference_count", 0)) - int(original(before).get("inference_count", 0)) == 3
    success = original(after)["inference_stats"]["success"]
    assert int(success["count"]) >= 1 and int(success["ns"]) > 0


def test_unsupported_rpcs_are_unimplemented(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.get_system_shared_memory_status()
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"
    with pytest.raises(InferenceServerException) as info:
        client.get_trace_settings()
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"


def test_repository_index_lists_model(client: triton.InferenceServerClient) -> None:
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {"name": MODEL, "version": "1", "state": "READY", "reason": "original"} in index
