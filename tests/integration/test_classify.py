"""``slimserve.v1.Classifier/Classify``, health checking and reflection against a real server."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from compression.models.digits.data import encode_png, load_splits
from protos import classifier_pb2, classifier_pb2_grpc
from tests.serving import ServerThread


@pytest.fixture(scope="module")
def channel(digits_server: ServerThread) -> grpc.Channel:
    return grpc.insecure_channel(digits_server.address)


@pytest.fixture(scope="module")
def classifier(channel: grpc.Channel) -> classifier_pb2_grpc.ClassifierStub:
    return classifier_pb2_grpc.ClassifierStub(channel)


def test_classify_png_digits_accuracy(classifier: classifier_pb2_grpc.ClassifierStub) -> None:
    split = load_splits()["test"]
    pngs = [encode_png(image) for image in split.images]
    predicted = []
    for start in range(0, len(pngs), 50):
        response = classifier.Classify(
            classifier_pb2.ClassifyRequest(model_name="digits", images=pngs[start : start + 50], top_k=3)
        )
        assert response.model_name == "digits" and response.variant == "original"
        assert len(response.results) == len(pngs[start : start + 50])
        for result in response.results:
            assert len(result.classes) == 3
            scores = [c.score for c in result.classes]
            assert scores == sorted(scores, reverse=True) and 0 <= scores[-1] <= scores[0] <= 1
            assert result.classes[0].label == str(result.classes[0].index)
            predicted.append(result.classes[0].index)
    accuracy = float((np.array(predicted) == split.labels).mean())
    assert accuracy >= 0.97, f"Classify top-1 on 500 held-out PNG digits is {accuracy:.3f}"


def test_classify_default_top_k_and_pinned_variant(classifier: classifier_pb2_grpc.ClassifierStub) -> None:
    png = encode_png(load_splits()["test"].images[0])
    response = classifier.Classify(
        classifier_pb2.ClassifyRequest(model_name="digits", images=[png], variant="original")
    )
    assert response.variant == "original"
    assert len(response.results[0].classes) == 5
    assert sum(c.score for c in response.results[0].classes) <= 1.0 + 1e-5


def test_health_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.GRPCInferenceService", "slimserve.v1.Classifier"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING, service


def test_reflection_lists_services(channel: grpc.Channel) -> None:
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"inference.GRPCInferenceService", "slimserve.v1.Classifier", "grpc.health.v1.Health"} <= services
    method = ProtoReflectionDescriptorDatabase(channel).FindFileContainingSymbol("slimserve.v1.Classifier")
    assert method.name.endswith("classifier.proto")
