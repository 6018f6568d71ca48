"""A small synchronous client for slimserve: the Classifier API and KServe v2 inference.

    with SlimserveClient("localhost:8001") as client:
        response = client.classify([open("seven.png", "rb").read()], top_k=3)
        logits = client.infer("digits", np.zeros((1, 1, 28, 28), np.float32))

gRPC failures are raised unchanged as `grpc.RpcError` (read `.code()` and
`.details()`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import TracebackType

import numpy as np

from clients.codec import build_classify_request, build_infer_request, output_array
from clients.tls import Tls, sync_channel
from protos import admin_pb2, admin_pb2_grpc, classifier_pb2, classifier_pb2_grpc
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger("slimserve.client")

DEFAULT_ADDRESS = "localhost:8001"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# NOTE: grpcio's default receive limit is 4 MiB, less than a batch of eight
# 3x224x224 FP32 images; both directions are raised.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token` as a bearer token (empty without a token)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


class SlimserveClient:
    """A plain gRPC channel to one server, with stubs for both services.

    `timeout` (seconds) is the deadline of every call; None means no deadline.
    `tls` makes the channel TLS (mutual TLS with a client certificate); `token`
    is sent as a bearer token with every call.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        token: str | None = None,
        timeout: float | None = None,
        tls: Tls | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.metadata = auth_metadata(token)
        self._channel = sync_channel(address, tls, CHANNEL_OPTIONS)
        self._inference = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._classifier = classifier_pb2_grpc.ClassifierStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)
        # (model, version) -> metadata; a model's inputs do not change while it is served.
        self._metadata_cache: dict[tuple[str, str], pb.ModelMetadataResponse] = {}

    def __enter__(self) -> SlimserveClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def classify(
        self, images: Sequence[bytes], *, model: str = "digits", top_k: int = 5, variant: str = ""
    ) -> classifier_pb2.ClassifyResponse:
        """Classify encoded images (JPEG/PNG); one result per image, in order."""
        request = build_classify_request(images, model=model, top_k=top_k, variant=variant)
        return self._classifier.Classify(request, **self._call_options())

    def infer(self, model: str, inputs: np.ndarray, *, input_name: str | None = None, version: str = "") -> np.ndarray:
        """Run `inputs` (batch dimension included) through `model`; return its first output.

        Without `input_name`, the model's metadata (fetched once, then cached)
        gives the input's name and datatype, and `inputs` is cast to that
        datatype; with it, the datatype follows `inputs.dtype`.
        """
        datatype = None
        if input_name is None:
            tensor = self._single_input(model, version)
            input_name, datatype = tensor.name, tensor.datatype
        request = build_infer_request(model, input_name, np.asarray(inputs), datatype=datatype, version=version)
        response = self._inference.ModelInfer(request, **self._call_options())
        return output_array(response)

    def variant_state(self, model: str) -> admin_pb2.VariantState:
        """Which variant answers ``model`` by default, whether it is pinned, and the guardrail's figures."""
        return self._admin.GetVariant(admin_pb2.GetVariantRequest(model_name=model), **self._call_options())

    def set_variant(self, model: str, variant: str = "", *, pin: bool = False) -> admin_pb2.VariantState:
        """Make ``variant`` the default ("" keeps the current one); ``pin`` stops the guardrail switching it."""
        request = admin_pb2.SetVariantRequest(model_name=model, variant=variant, pin=pin)
        return self._admin.SetVariant(request, **self._call_options())

    def server_ready(self) -> bool:
        return self._inference.ServerReady(pb.ServerReadyRequest(), **self._call_options()).ready

    def model_metadata(self, model: str, version: str = "") -> pb.ModelMetadataResponse:
        request = pb.ModelMetadataRequest(name=model, version=version)
        return self._inference.ModelMetadata(request, **self._call_options())

    def _call_options(self) -> dict[str, object]:
        return {"timeout": self.timeout, "metadata": self.metadata}

    def _single_input(self, model: str, version: str) -> pb.ModelMetadataResponse.TensorMetadata:
        key = (model, version)
        if key not in self._metadata_cache:
            self._metadata_cache[key] = self.model_metadata(model, version)
            log.debug("metadata of %s: %s", model, self._metadata_cache[key])
        inputs = self._metadata_cache[key].inputs
        if len(inputs) != 1:
            raise ValueError(f"model {model!r} has {len(inputs)} inputs; pass input_name to infer()")
        return inputs[0]
