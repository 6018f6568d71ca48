"""TLS, mutual TLS and bearer tokens with real certificates: who is refused, how, and who gets through."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from clients import cli
from clients.client import SlimserveClient, auth_metadata
from clients.codec import build_infer_request
from clients.tls import Tls
from compression.models.digits.data import encode_png, load_splits
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from server.config.settings import AuthSettings, DeployConfig, ServerSettings, TlsSettings
from tests.certs import Authority, Pem
from tests.conftest import digits_without_compression
from tests.serving import ServerThread, running_server

TOKEN = "s3cret-token-for-tests"
ZEROS = np.zeros((1, 1, 28, 28), np.float32)


class Pki:
    """A trusted CA with a server and a client certificate, and a rogue CA with its own client certificate."""

    def __init__(self, folder: Path) -> None:
        self.ca = Authority.create(folder, "trusted")
        self.server: Pem = self.ca.issue("server", server=True)
        self.client: Pem = self.ca.issue("client", server=False)
        self.rogue_ca = Authority.create(folder, "rogue")
        self.rogue_client: Pem = self.rogue_ca.issue("rogue-client", server=False)

    def tls(self, *, ca: Authority | None = None, client: Pem | None = None) -> Tls:
        return Tls.from_files(
            root_cert=(ca or self.ca).cert_file,
            client_cert=client.cert if client else None,
            client_key=client.key if client else None,
        )


def secured(server: ServerSettings, **update: object) -> DeployConfig:
    config = digits_without_compression()
    return config.model_copy(update={"server": server.model_copy(update=update)})


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_token_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """TLS (no client certificates) plus bearer-token auth, tokens from a file."""
    tokens = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    tokens.write_text(f"# ops-managed\n\nsome-other-token\n{TOKEN}\n")
    config = secured(
        ServerSettings(),
        tls=TlsSettings(cert_file=pki.server.cert, key_file=pki.server.key),
        auth=AuthSettings(tokens_file=tokens),
    )
    with running_server(config) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(pki: Pki) -> Iterator[ServerThread]:
    """Mutual TLS: clients need a certificate signed by the trusted CA; no tokens."""
    config = secured(
        ServerSettings(),
        tls=TlsSettings(cert_file=pki.server.cert, key_file=pki.server.key, client_ca_file=pki.ca.cert_file),
    )
    with running_server(config) as server:
        yield server


def infer(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> pb.ModelInferResponse:
    request = build_infer_request("digits", "input", ZEROS, datatype="FP32")
    return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=metadata, timeout=20)


def rpc_error(call: object, *args: object, **kwargs: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return info.value


def secure(server: ServerThread, tls: Tls) -> grpc.Channel:
    return grpc.secure_channel(server.address, tls.credentials())


# --- bearer tokens over TLS ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "fragment"),
    [
        ((), "missing credentials: send metadata 'authorization: Bearer <token>'"),
        ((("authorization", "Bearer wrong-token"),), "invalid bearer token"),
        ((("authorization", f"Basic {TOKEN}"),), "malformed authorization metadata"),
        ((("authorization", "Bearer"),), "malformed authorization metadata"),
        ((("authorization", f"Bearer {TOKEN}x"),), "invalid bearer token"),
    ],
)
def test_calls_without_a_valid_token_are_unauthenticated(
    pki: Pki, tls_token_server: ServerThread, metadata: tuple[tuple[str, str], ...], fragment: str
) -> None:
    channel = secure(tls_token_server, pki.tls())
    error = rpc_error(infer, channel, metadata)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and fragment in error.details(), error.details()
    assert infer(channel, auth_metadata(TOKEN)).model_name == "digits"  # the server goes on


def test_every_service_but_health_needs_the_token(pki: Pki, tls_token_server: ServerThread) -> None:
    channel = secure(tls_token_server, pki.tls())
    kserve = pb_grpc.GRPCInferenceServiceStub(channel)
    for call, request in [
        (kserve.ServerMetadata, pb.ServerMetadataRequest()),
        (kserve.ModelMetadata, pb.ModelMetadataRequest(name="digits")),
        (kserve.ServerReady, pb.ServerReadyRequest()),
        (kserve.RepositoryIndex, pb.RepositoryIndexRequest()),
    ]:
        assert rpc_error(call, request).code() == grpc.StatusCode.UNAUTHENTICATED
        call(request, metadata=auth_metadata(TOKEN))
    # streaming methods too: ModelStreamInfer, and server reflection (which would list the services)
    stream = kserve.ModelStreamInfer(iter([build_infer_request("digits", "input", ZEROS, datatype="FP32")]))
    assert rpc_error(list, stream).code() == grpc.StatusCode.UNAUTHENTICATED
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    listing = reflection_pb2.ServerReflectionRequest(list_services="")
    assert rpc_error(list, reflection.ServerReflectionInfo(iter([listing]))).code() == grpc.StatusCode.UNAUTHENTICATED
    answers = list(reflection.ServerReflectionInfo(iter([listing]), metadata=auth_metadata(TOKEN)))
    assert "inference.GRPCInferenceService" in {s.name for s in answers[0].list_services_response.service}
    # health stays open for probes, both Check and the streaming Watch
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=20)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


def test_clients_with_the_ca_and_token_succeed(pki: Pki, tls_token_server: ServerThread, tmp_path: Path) -> None:
    split = load_splits()["test"]
    # slimserve's own client
    with SlimserveClient(tls_token_server.address, tls=pki.tls(), token=TOKEN, timeout=20) as client:
        png = encode_png(split.images[0])
        assert client.classify([png], top_k=1).results[0].classes[0].index == split.labels[0]
        assert client.infer("digits", ZEROS).shape == (1, 10)
    # stock tritonclient: ssl=True with the CA, the token as a header
    triton_client = triton.InferenceServerClient(
        tls_token_server.address, ssl=True, root_certificates=str(pki.ca.cert_file)
    )
    tensor = triton.InferInput("input", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(ZEROS)
    headers = {"authorization": f"Bearer {TOKEN}"}
    assert triton_client.infer("digits", [tensor], headers=headers).as_numpy("logits").shape == (1, 10)
    with pytest.raises(InferenceServerException) as info:
        triton_client.infer("digits", [tensor])
    assert info.value.status() == "StatusCode.UNAUTHENTICATED"
    # the command-line client
    image = tmp_path / "digit.png"
    image.write_bytes(encode_png(split.images[0]))
    flags = ["--address", tls_token_server.address, "--ca-cert", str(pki.ca.cert_file), "--top-k", "1"]
    assert cli.main(["classify", str(image), *flags, "--token", TOKEN]) == 0
    assert cli.main(["classify", str(image), *flags, "--token", "nope"]) == 1


def test_clients_that_do_not_trust_the_server_certificate_fail_the_handshake(
    pki: Pki, tls_token_server: ServerThread
) -> None:
    """The client, not the server, refuses here: the handshake fails, which gRPC reports as UNAVAILABLE
    (the call never reaches the server, so it cannot be UNAUTHENTICATED)."""
    wrong_ca = rpc_error(infer, secure(tls_token_server, pki.tls(ca=pki.rogue_ca)), auth_metadata(TOKEN))
    assert wrong_ca.code() == grpc.StatusCode.UNAVAILABLE and "CERTIFICATE_VERIFY_FAILED" in wrong_ca.details()
    plaintext = grpc.insecure_channel(tls_token_server.address)
    assert rpc_error(infer, plaintext, auth_metadata(TOKEN)).code() == grpc.StatusCode.UNAVAILABLE


def test_tokens_from_an_environment_variable_over_plaintext(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIMSERVE_TEST_TOKENS", f" first-token ,{TOKEN}")
    config = secured(ServerSettings(), auth=AuthSettings(tokens_env="SLIMSERVE_TEST_TOKENS"))
    with running_server(config) as server:
        channel = grpc.insecure_channel(server.address)
        assert rpc_error(infer, channel).code() == grpc.StatusCode.UNAUTHENTICATED
        for token in ("first-token", TOKEN):
            assert infer(channel, auth_metadata(token)).model_name == "digits"
        assert rpc_error(infer, channel, auth_metadata("first")).code() == grpc.StatusCode.UNAUTHENTICATED


# --- mutual TLS ----------------------------------------------------------------------------------


def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_configured_ca(
    pki: Pki, mtls_server: ServerThread
) -> None:
    """Without a client certificate, or with one from another CA, the server aborts the TLS handshake:
    gRPC reports UNAVAILABLE to the client (no call is ever made, so there is no UNAUTHENTICATED)."""
    for tls in (pki.tls(), pki.tls(client=pki.rogue_client)):
        error = rpc_error(infer, secure(mtls_server, tls))
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    assert infer(secure(mtls_server, pki.tls(client=pki.client))).model_name == "digits"
    triton_client = triton.InferenceServerClient(
        mtls_server.address,
        ssl=True,
        root_certificates=str(pki.ca.cert_file),
        private_key=str(pki.client.key),
        certificate_chain=str(pki.client.cert),
    )
    tensor = triton.InferInput("input", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(ZEROS)
    assert triton_client.infer("digits", [tensor]).as_numpy("logits").shape == (1, 10)


# --- metrics on their own interface --------------------------------------------------------------


def test_metrics_bind_to_their_own_interface() -> None:
    """gRPC on 127.0.0.1, metrics on 127.0.0.2 only (both loopback on Linux)."""
    config = secured(ServerSettings(), metrics_host="127.0.0.2")
    with running_server(config) as server:
        port = server.server.metrics_port
        assert b"slimserve_requests" in urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=10).read()
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
