"""KServe v2 over HTTP against a real server, spoken by the stock ``tritonclient.http`` and by raw HTTP:
the same answers as gRPC for the same input, and the v2 spec's HTTP statuses for bad requests."""

from __future__ import annotations

import base64
import http.client
import json
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from compression.models.digits.data import encode_png, load_splits, normalize
from protos import classifier_pb2, classifier_pb2_grpc
from server.config.settings import AuthSettings
from tests.conftest import digits_without_compression
from tests.serving import ServerThread, running_server

MODEL = "digits"
TOKEN = "rest-token-for-tests"
TOKENS_ENV = "SLIMSERVE_TEST_REST_TOKENS"


@pytest.fixture(scope="module")
def http_client(digits_server: ServerThread) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(digits_server.http_address)


@pytest.fixture(scope="module")
def grpc_client(digits_server: ServerThread) -> triton_grpc.InferenceServerClient:
    return triton_grpc.InferenceServerClient(digits_server.address)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return normalize(load_splits()["test"].images[:16])


def request(
    server: ServerThread, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP call: status, headers, body."""
    connection = http.client.HTTPConnection(*server.http_address.split(":"), timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def http_infer(
    client: triton_http.InferenceServerClient, batch: np.ndarray, *, binary: bool = True, classes: int = 0
) -> triton_http.InferResult:
    tensor = triton_http.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    output = triton_http.InferRequestedOutput("logits", binary_data=binary, class_count=classes)
    return client.infer(MODEL, [tensor], outputs=[output])


def grpc_infer(client: triton_grpc.InferenceServerClient, batch: np.ndarray, classes: int = 0) -> np.ndarray:
    tensor = triton_grpc.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    output = triton_grpc.InferRequestedOutput("logits", class_count=classes)
    result = client.infer(MODEL, [tensor], outputs=[output]).as_numpy("logits")
    assert result is not None
    return result


def test_health_metadata_config_and_index(http_client: triton_http.InferenceServerClient) -> None:
    assert http_client.is_server_live() and http_client.is_server_ready()
    assert http_client.is_model_ready(MODEL) and http_client.is_model_ready(MODEL, "1")
    assert not http_client.is_model_ready("no-such-model")
    metadata = http_client.get_server_metadata()
    assert metadata["name"] == "slimserve" and "classification" in metadata["extensions"]
    model = http_client.get_model_metadata(MODEL)
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert model["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    config = http_client.get_model_config(MODEL)
    assert config["max_batch_size"] >= 8 and config["input"][0]["dims"] == [1, 28, 28]
    index = http_client.get_model_repository_index()
    assert {"name": MODEL, "version": "1", "state": "READY", "reason": "original"} in index


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_matches_grpc(
    http_client: triton_http.InferenceServerClient,
    grpc_client: triton_grpc.InferenceServerClient,
    digits: np.ndarray,
    binary: bool,
) -> None:
    over_http = http_infer(http_client, digits, binary=binary).as_numpy("logits")
    assert over_http is not None and over_http.shape == (16, 10)
    np.testing.assert_allclose(over_http, grpc_infer(grpc_client, digits), rtol=1e-5, atol=1e-5)
    labels = load_splits()["test"].labels[:16]
    assert (over_http.argmax(1) == labels).mean() >= 0.9


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_classification_strings_match_grpc(
    http_client: triton_http.InferenceServerClient,
    grpc_client: triton_grpc.InferenceServerClient,
    digits: np.ndarray,
    binary: bool,
) -> None:
    over_http = http_infer(http_client, digits[:4], binary=binary, classes=3).as_numpy("logits")
    assert over_http is not None and over_http.shape == (4, 3)
    over_grpc = grpc_infer(grpc_client, digits[:4], classes=3)
    assert [[bytes(x) if not isinstance(x, str) else x.encode() for x in row] for row in over_http.tolist()] == [
        [bytes(x) for x in row] for row in over_grpc.tolist()
    ]


def test_statistics_count_http_requests(http_client: triton_http.InferenceServerClient, digits: np.ndarray) -> None:
    def count() -> int:
        stats = http_client.get_inference_statistics(MODEL)["model_stats"]
        return sum(entry["inference_count"] for entry in stats)

    before = count()
    http_infer(http_client, digits[:3])
    assert count() == before + 3
    everything = http_client.get_inference_statistics()["model_stats"]
    assert {entry["name"] for entry in everything} == {MODEL}
    assert isinstance(everything[0]["inference_stats"]["success"]["ns"], int)


def test_classify_multipart_and_json_match_grpc(digits_server: ServerThread) -> None:
    pngs = [encode_png(image) for image in load_splits()["test"].images[:3]]
    stub = classifier_pb2_grpc.ClassifierStub(triton_grpc_channel(digits_server))
    expected = stub.Classify(classifier_pb2.ClassifyRequest(model_name=MODEL, images=pngs, top_k=2))
    boundary = "slimserve-test-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + png
        + b"\r\n"
        for i, png in enumerate(pngs)
    ]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n2\r\n'.encode())
    multipart = b"".join(parts) + f"--{boundary}--\r\n".encode()
    answers = [
        request(
            digits_server,
            "POST",
            f"/v2/models/{MODEL}/classify",
            multipart,
            {"Content-Type": f"multipart/form-data; boundary={boundary}"},
        ),
        request(
            digits_server,
            "POST",
            f"/v2/models/{MODEL}/classify",
            json.dumps({"images": [base64.b64encode(p).decode() for p in pngs], "top_k": 2}).encode(),
            {"Content-Type": "application/json"},
        ),
    ]
    for status, _, body in answers:
        assert status == 200, body
        document = json.loads(body)
        assert document["model_name"] == MODEL and document["variant"] == "original"
        got = [[(c["label"], c["index"]) for c in r["classes"]] for r in document["results"]]
        assert got == [[(c.label, c.index) for c in r.classes] for r in expected.results]
        scores = [c["score"] for r in document["results"] for c in r["classes"]]
        np.testing.assert_allclose(scores, [c.score for r in expected.results for c in r.classes], rtol=1e-5)


def triton_grpc_channel(server: ServerThread) -> object:
    import grpc

    return grpc.insecure_channel(server.address)


def infer_body(batch: np.ndarray, *, declared: int | None = None) -> tuple[bytes, dict[str, str]]:
    raw = batch.astype(np.float32).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(batch.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw) if declared is None else declared},
                }
            ]
        }
    ).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "message"),
    [
        ("/v2/models/nope/infer", b"{}", {}, 404, "unknown model 'nope'"),
        (f"/v2/models/{MODEL}/versions/9/infer", b"{}", {}, 404, "has no version '9'"),
        (f"/v2/models/{MODEL}/infer", b"{not json", {}, 400, "is not valid JSON"),
        (f"/v2/models/{MODEL}/infer", b'{"inputs": []}', {}, 400, "non-empty 'inputs' list"),
        (f"/v2/models/{MODEL}/infer", *infer_body(np.zeros((1, 1, 28, 28)), declared=99), 400, "binary data"),
        (f"/v2/models/{MODEL}/infer", *infer_body(np.zeros((1, 1, 28, 28)), declared=10**7), 400, "bytes of binary"),
        (f"/v2/models/{MODEL}/infer", *infer_body(np.zeros((1, 1, 27, 28))), 400, "expected [-1, 1, 28, 28]"),
        (f"/v2/models/{MODEL}/infer", b"x" * 10, {"Inference-Header-Content-Length": "20"}, 400, "body has 10"),
        (f"/v2/models/{MODEL}/classify", b'{"images": ["%%%"]}', {}, 400, "not valid base64"),
        ("/v2/nowhere", None, {}, 404, "Not Found"),
    ],
)
def test_bad_requests_get_their_status_and_the_server_keeps_serving(
    digits_server: ServerThread,
    http_client: triton_http.InferenceServerClient,
    digits: np.ndarray,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    status: int,
    message: str,
) -> None:
    got, _, answer = request(digits_server, "POST" if body is not None else "GET", path, body, headers)
    assert got == status, answer
    assert message in json.loads(answer)["error"]
    assert http_infer(http_client, digits[:1]).as_numpy("logits").shape == (1, 10)


def test_unknown_model_through_tritonclient(http_client: triton_http.InferenceServerClient) -> None:
    tensor = triton_http.InferInput("input", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32))
    with pytest.raises(InferenceServerException) as raised:
        http_client.infer("nope", [tensor])
    assert raised.value.status() == "404" and "unknown model 'nope'" in raised.value.message()


@pytest.fixture(scope="module")
def guarded_server(monkeypatch_module: pytest.MonkeyPatch) -> Iterator[ServerThread]:
    """Bearer tokens on, and the smallest message limit (4 MiB)."""
    monkeypatch_module.setenv(TOKENS_ENV, TOKEN)
    config = digits_without_compression()
    server = config.server.model_copy(
        update={"auth": AuthSettings(tokens_env=TOKENS_ENV), "max_message_bytes": 4 * 1024 * 1024}
    )
    with running_server(config.model_copy(update={"server": server})) as running:
        yield running


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_tokens_and_body_limit(guarded_server: ServerThread, digits: np.ndarray) -> None:
    body, headers = infer_body(digits[:2])
    path = f"/v2/models/{MODEL}/infer"
    status, answer_headers, answer = request(guarded_server, "POST", path, body, headers)
    assert status == 401 and answer_headers.get("WWW-Authenticate") == "Bearer"
    assert "missing credentials: send header 'authorization: Bearer <token>'" in json.loads(answer)["error"]
    wrong = {**headers, "Authorization": "Bearer wrong"}
    assert request(guarded_server, "POST", path, body, wrong)[0] == 401
    assert request(guarded_server, "GET", "/v2/health/ready")[0] == 200  # probes need no token
    authorized = {**headers, "Authorization": f"Bearer {TOKEN}"}
    status, _, answer = request(guarded_server, "POST", path, body, authorized)
    assert status == 200, answer
    huge, huge_headers = infer_body(np.zeros((6, 1, 448, 448), np.float32))
    status, _, answer = request(guarded_server, "POST", path, huge, {**huge_headers, **authorized})
    assert status == 413 and "exceeds the limit of 4194304 bytes" in json.loads(answer)["error"]
    client = triton_http.InferenceServerClient(guarded_server.http_address)
    tensor = triton_http.InferInput("input", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(digits[:1])
    logits = client.infer(MODEL, [tensor], headers={"Authorization": f"Bearer {TOKEN}"}).as_numpy("logits")
    assert logits is not None and logits.shape == (1, 10)
