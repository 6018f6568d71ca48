"""Loading, replacing and unloading models on a running server through the repository API, with stock
``tritonclient`` (gRPC and HTTP): what is served stays served, and no accepted request is lost."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from compression.models.digits.data import load_splits, normalize
from server.config.settings import DeployConfig, ModelSettings
from tests.compressed_digits import CHOSEN, digits_config, seed_trained_digits
from tests.conftest import digits_without_compression
from tests.serving import ServerThread, eventually, running_server

SECOND = "digits2"


def explicit(config: DeployConfig) -> DeployConfig:
    return config.model_copy(update={"server": config.server.model_copy(update={"model_control": "explicit"})})


def entry(settings: ModelSettings, name: str = SECOND, **update: object) -> str:
    """A model entry of the deploy config, as JSON, for ``load_model(config=...)``."""
    return json.dumps({**settings.model_copy(update=update).model_dump(mode="json"), "name": name})


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with running_server(explicit(digits_without_compression())) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ServerThread) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.address)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    split = load_splits()["test"]
    return normalize(split.images[:32]), split.labels[:32]


def infer(client: triton.InferenceServerClient, model: str, batch: np.ndarray) -> triton.InferResult:
    tensor = triton.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    return client.infer(model, [tensor])


def index(client: triton.InferenceServerClient) -> list[dict]:
    return client.get_model_repository_index(as_json=True).get("models", [])


def test_load_a_second_model_then_unload_it_under_load(
    server: ServerThread, client: triton.InferenceServerClient, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = digits
    base = server.server.config.models[0]
    client.load_model(SECOND, config=entry(base))
    assert {"name": SECOND, "version": "1", "state": "READY", "reason": "original"} in index(client)
    logits = infer(client, SECOND, images).as_numpy("logits")
    assert logits is not None and (logits.argmax(1) == labels).mean() >= 0.9
    assert infer(client, "digits", images[:1]).as_numpy("logits") is not None

    outcomes: Counter[str] = Counter()
    stop = threading.Event()

    def hammer() -> None:
        own = triton.InferenceServerClient(server.address)
        while not stop.is_set():
            try:
                infer(own, SECOND, images[:4])
                outcomes["ok"] += 1
            except InferenceServerException as exc:
                outcomes[f"{exc.status()}: {exc.message().split(';')[0]}"] += 1

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    eventually(lambda: outcomes["ok"] >= 20)
    client.unload_model(SECOND)
    eventually(lambda: sum(n for k, n in outcomes.items() if k != "ok") >= 8)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    refusals = {key for key in outcomes if key != "ok"}
    assert refusals <= {
        f"StatusCode.UNAVAILABLE: model {SECOND!r} is being unloaded",
        f"StatusCode.NOT_FOUND: unknown model {SECOND!r}",
    }, outcomes
    assert f"StatusCode.NOT_FOUND: unknown model {SECOND!r}" in refusals
    assert all(row["name"] != SECOND for row in index(client))
    assert infer(client, "digits", images[:1]).as_numpy("logits") is not None  # the first model never noticed


def test_replacing_a_model_drops_no_request(
    server: ServerThread, client: triton.InferenceServerClient, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    images, _ = digits
    base = server.server.config.models[0]
    client.load_model(SECOND, config=entry(base))
    failures: list[str] = []
    answered = Counter[str]()
    stop = threading.Event()

    def hammer() -> None:
        own = triton.InferenceServerClient(server.address)
        output = triton.InferRequestedOutput("logits", class_count=1)
        tensor = triton.InferInput("input", [1, 1, 28, 28], "FP32")
        tensor.set_data_from_numpy(images[:1])
        while not stop.is_set():
            try:
                top = own.infer(SECOND, [tensor], outputs=[output]).as_numpy("logits")
                answered[top[0][0].decode().rsplit(":", 1)[1]] += 1
            except InferenceServerException as exc:
                failures.append(f"{exc.status()} {exc.message()}")

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    eventually(lambda: sum(answered.values()) >= 20)
    renamed = [f"label-{i}" for i in range(10)]
    client.load_model(SECOND, config=entry(base, labels=renamed))
    eventually(lambda: any(label.startswith("label-") for label in answered))
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert failures == []
    assert any(not label.startswith("label-") for label in answered)  # the old model answered first
    client.unload_model(SECOND)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{not json", "is not valid JSON"),
        (json.dumps({"source": {"format": "builtin"}, "labelz": []}), "labelz: unknown field"),
        (json.dumps({"source": {"format": "torchvision", "architecture": "resnet18"}, "device": "tpu"}), "device"),
        (json.dumps({"name": "other", "source": {"format": "builtin"}}), "the names must agree"),
        (
            json.dumps({"source": {"format": "pickle", "path": "/tmp/x.pt", "trust_pickle": True}}),
            "cannot be loaded through the repository API",
        ),
        (
            json.dumps({"source": {"format": "python", "factory": "subprocess:run", "kwargs": {"args": "true"}}}),
            "cannot be loaded through the repository API",
        ),
        (json.dumps({"source": {"format": "torchscript", "path": "/nonexistent.pt"}}), "/nonexistent.pt"),
    ],
)
def test_a_bad_config_is_refused_and_nothing_served_changes(
    server: ServerThread,
    client: triton.InferenceServerClient,
    digits: tuple[np.ndarray, np.ndarray],
    config: str,
    message: str,
) -> None:
    before = [row for row in index(client) if row["state"] == "READY"]
    with pytest.raises(InferenceServerException) as refused:
        client.load_model(SECOND, config=config)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in refused.value.message()
    assert [row for row in index(client) if row["state"] == "READY"] == before
    assert infer(client, "digits", digits[0][:2]).as_numpy("logits") is not None
    client.unload_model(SECOND) if any(row["name"] == SECOND for row in index(client)) else None


def test_rest_load_and_unload(server: ServerThread, digits: tuple[np.ndarray, np.ndarray]) -> None:
    http = triton_http.InferenceServerClient(server.http_address)
    http.load_model(SECOND, config=entry(server.server.config.models[0]))
    assert http.is_model_ready(SECOND)
    tensor = triton_http.InferInput("input", [2, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(digits[0][:2])
    assert http.infer(SECOND, [tensor]).as_numpy("logits").shape == (2, 10)
    http.unload_model(SECOND)
    assert not http.is_model_ready(SECOND)
    with pytest.raises(InferenceServerException) as refused:
        http.unload_model(SECOND)
    assert refused.value.status() == "404"


def test_model_control_off_refuses_both_calls(digits_server: ServerThread) -> None:
    client = triton.InferenceServerClient(digits_server.address)
    for call in (lambda: client.load_model(SECOND, config="{}"), lambda: client.unload_model("digits")):
        with pytest.raises(InferenceServerException) as refused:
            call()
        assert refused.value.status() == "StatusCode.FAILED_PRECONDITION"
        assert "set server.model_control: explicit" in refused.value.message()
    assert client.is_model_ready("digits")


@pytest.mark.slow
def test_a_loaded_model_gets_its_compressed_variant_by_hot_swap(tmp_path: Path) -> None:
    seed_trained_digits(tmp_path)
    compressed = digits_config(tmp_path).models[0]
    config = explicit(digits_without_compression()).model_copy(update={"cache_dir": tmp_path})
    with running_server(config) as running:
        client = triton.InferenceServerClient(running.address)
        client.load_model(SECOND, config=entry(compressed))
        rows = [row for row in index(client) if row["name"] == SECOND]
        assert rows and rows[0]["state"] == "COMPRESSING", rows
        assert infer(client, SECOND, np.zeros((1, 1, 28, 28), np.float32)).get_response().model_version == "original"
        eventually(
            lambda: infer(client, SECOND, np.zeros((1, 1, 28, 28), np.float32)).get_response().model_version == CHOSEN,
            timeout=600,
        )
        states = {row["state"] for row in index(client) if row["name"] == SECOND}
        assert states == {"READY"}


def test_the_api_follows_the_servers_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.config.settings import AuthSettings

    monkeypatch.setenv("SLIMSERVE_TEST_CONTROL_TOKENS", "control-token")
    config = explicit(digits_without_compression())
    server = config.server.model_copy(update={"auth": AuthSettings(tokens_env="SLIMSERVE_TEST_CONTROL_TOKENS")})
    with running_server(config.model_copy(update={"server": server})) as running:
        client = triton.InferenceServerClient(running.address)
        with pytest.raises(InferenceServerException) as refused:
            client.unload_model("digits")
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
        assert client.is_model_ready("digits", headers={"authorization": "Bearer control-token"})
