"""Bad requests get the right status and a clear message, and the server keeps serving."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from compression.models.digits.data import encode_png, load_splits, normalize
from protos import classifier_pb2, classifier_pb2_grpc, grpc_service_pb2, grpc_service_pb2_grpc
from tests.serving import ServerThread


@pytest.fixture(scope="module")
def client(digits_server: ServerThread) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(digits_server.address)


@pytest.fixture(scope="module")
def classifier(digits_server: ServerThread) -> classifier_pb2_grpc.ClassifierStub:
    return classifier_pb2_grpc.ClassifierStub(grpc.insecure_channel(digits_server.address))


@pytest.fixture(scope="module")
def kserve(digits_server: ServerThread) -> grpc_service_pb2_grpc.GRPCInferenceServiceStub:
    return grpc_service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(digits_server.address))


def good_infer(client: triton.InferenceServerClient) -> None:
    """After every error the next good request must still be answered correctly."""
    split = load_splits()["test"]
    tensor = triton.InferInput("input", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(normalize(split.images[:1]))
    assert client.infer("digits", [tensor]).as_numpy("logits").argmax() == split.labels[0]


def infer_error(
    client: triton.InferenceServerClient, model: str, array: np.ndarray, datatype: str = "FP32", **kwargs: object
) -> InferenceServerException:
    tensor = triton.InferInput(kwargs.pop("name", "input"), list(array.shape), datatype)  # type: ignore[arg-type]
    tensor.set_data_from_numpy(array)
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, [tensor], **kwargs)  # type: ignore[arg-type]
    good_infer(client)
    return info.value


def classify_error(
    classifier: classifier_pb2_grpc.ClassifierStub, images: list[bytes], model: str = "digits", **fields: object
) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        classifier.Classify(classifier_pb2.ClassifyRequest(model_name=model, images=images, **fields))
    png = encode_png(load_splits()["test"].images[0])
    classifier.Classify(classifier_pb2.ClassifyRequest(model_name="digits", images=[png]))
    return info.value


ZEROS = np.zeros((1, 1, 28, 28), np.float32)


@pytest.mark.parametrize(
    ("case", "model", "array", "datatype", "status", "fragment"),
    [
        ("unknown model", "nope", ZEROS, "FP32", "NOT_FOUND", "unknown model 'nope'"),
        ("wrong shape", "digits", np.zeros((1, 1, 32, 32), np.float32), "FP32", "INVALID_ARGUMENT", "shape"),
        ("missing channel dim", "digits", np.zeros((1, 28, 28), np.float32), "FP32", "INVALID_ARGUMENT", "shape"),
        ("wrong dtype", "digits", np.zeros((1, 1, 28, 28), np.float64), "FP64", "INVALID_ARGUMENT", "FP32"),
        ("int dtype", "digits", np.zeros((1, 1, 28, 28), np.int32), "INT32", "INVALID_ARGUMENT", "FP32"),
        ("batch too large", "digits", np.zeros((1000, 1, 28, 28), np.float32), "FP32", "INVALID_ARGUMENT", "batch"),
    ],
)
def test_infer_rejections(
    client: triton.InferenceServerClient,
    case: str,
    model: str,
    array: np.ndarray,
    datatype: str,
    status: str,
    fragment: str,
) -> None:
    error = infer_error(client, model, array, datatype)
    assert error.status() == f"StatusCode.{status}", case
    assert fragment in error.message(), error.message()


def test_unknown_version_is_not_found(client: triton.InferenceServerClient) -> None:
    error = infer_error(client, "digits", ZEROS, model_version="7")
    assert error.status() == "StatusCode.NOT_FOUND" and "version '7'" in error.message()


def test_wrong_input_name(client: triton.InferenceServerClient) -> None:
    error = infer_error(client, "digits", ZEROS, name="images")
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "'input'" in error.message()


def test_unknown_output_and_bad_classification(client: triton.InferenceServerClient) -> None:
    error = infer_error(client, "digits", ZEROS, outputs=[triton.InferRequestedOutput("probs")])
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "unknown output 'probs'" in error.message()
    bad = triton.InferRequestedOutput("logits")
    bad._output.parameters["classification"].string_param = "three"
    error = infer_error(client, "digits", ZEROS, outputs=[bad])
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "classification" in error.message()


def test_raw_contents_byte_length_mismatch(
    kserve: grpc_service_pb2_grpc.GRPCInferenceServiceStub, client: triton.InferenceServerClient
) -> None:
    request = grpc_service_pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    request.raw_input_contents.append(b"\0" * 100)
    with pytest.raises(grpc.RpcError) as info:
        kserve.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "100 bytes" in info.value.details() and "3136" in info.value.details()
    good_infer(client)


def test_typed_contents_are_accepted(kserve: grpc_service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    split = load_splits()["test"]
    request = grpc_service_pb2.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    tensor.contents.fp32_contents.extend(normalize(split.images[:1]).ravel().tolist())
    response = kserve.ModelInfer(request)
    logits = np.frombuffer(response.raw_output_contents[0], np.float32)
    assert logits.argmax() == split.labels[0]


@pytest.mark.parametrize(
    ("case", "images", "fragment"),
    [
        ("corrupt bytes", [b"\x89PNG\r\n\x1a\n" + b"garbage" * 20], "cannot be decoded"),
        ("not an image", [b"hello, world"], "not a JPEG or PNG image"),
        ("zero bytes", [b""], "empty"),
        ("truncated png", [encode_png(np.full((28, 28), 200, np.uint8))[:40]], "image 0"),
        ("no images", [], "no images"),
    ],
)
def test_classify_rejections(
    classifier: classifier_pb2_grpc.ClassifierStub, case: str, images: list[bytes], fragment: str
) -> None:
    error = classify_error(classifier, images)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, case
    assert fragment in error.details(), error.details()


def test_classify_unknown_model_and_variant(classifier: classifier_pb2_grpc.ClassifierStub) -> None:
    png = encode_png(load_splits()["test"].images[0])
    assert classify_error(classifier, [png], model="nope").code() == grpc.StatusCode.NOT_FOUND
    error = classify_error(classifier, [png], variant="tiny")
    assert error.code() == grpc.StatusCode.NOT_FOUND and "'tiny'" in error.details()


def test_classify_too_many_images(classifier: classifier_pb2_grpc.ClassifierStub) -> None:
    png = encode_png(load_splits()["test"].images[0])
    error = classify_error(classifier, [png] * 65)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit is 64" in error.details()
