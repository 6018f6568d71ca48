"""TLS, mutual TLS and bearer tokens with real certificates, on the gRPC port and on the HTTP (KServe v2 REST)
port: who is refused, how, and who gets through."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from gevent import ssl as gevent_ssl
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


# --- the HTTP port: HTTPS, mutual TLS and tokens (server/transport/rest.py) -------------------------

ZEROS_TENSOR = {"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32"}
ZEROS_HEADER = json.dumps({"inputs": [{**ZEROS_TENSOR, "parameters": {"binary_data_size": ZEROS.nbytes}}]}).encode()
INFER_BODY = ZEROS_HEADER + ZEROS.tobytes()
"""An infer of ZEROS in Triton's binary tensor extension, as tritonclient.http sends it."""
INFER_HEADERS = {"Inference-Header-Content-Length": str(len(ZEROS_HEADER))}


def client_context(pki: Pki, *, ca: Authority | None = None, client: Pem | None = None) -> ssl.SSLContext:
    """What an HTTPS client trusts (``ca``, the trusted CA by default) and the certificate it shows, if any."""
    context = ssl.create_default_context(cafile=(ca or pki.ca).cert_file)
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    return context


def https(
    server: ServerThread, context: ssl.SSLContext, method: str, path: str, *, token: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One HTTPS call (an infer of ZEROS for POST): status, headers, body."""
    host, port = server.http_address.split(":")
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=20)
    headers = {**INFER_HEADERS, **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        connection.request(method, path, body=INFER_BODY if method == "POST" else None, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def https_refused(server: ServerThread, context: ssl.SSLContext) -> Exception:
    """The exception that ends an HTTPS call refused in the TLS handshake, before any HTTP status: an SSLError,
    or in TLS 1.3, where the server judges a client certificate after the client's side of the handshake is
    done, the connection closed under the client's first read (RemoteDisconnected, a ConnectionResetError)."""
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)) as info:
        https(server, context, "GET", "/v2/health/ready")
    return info.value


GEVENT_HOSTNAME_CHECK = pytest.mark.filterwarnings("ignore:ssl.match_hostname:DeprecationWarning")
"""geventhttpclient (under tritonclient.http) still calls ssl.match_hostname."""


def triton_https(pki: Pki, server: ServerThread, client: Pem | None = None) -> triton_http.InferenceServerClient:
    """Stock tritonclient.http over HTTPS: gevent's SSL context with the trusted CA (and a client certificate)."""

    def context() -> gevent_ssl.SSLContext:
        made = gevent_ssl.create_default_context(cafile=str(pki.ca.cert_file))
        if client is not None:
            made.load_cert_chain(str(client.cert), str(client.key))
        return made

    return triton_http.InferenceServerClient(server.http_address, ssl=True, ssl_context_factory=context)


def triton_http_infer(client: triton_http.InferenceServerClient, token: str | None = None) -> np.ndarray:
    tensor = triton_http.InferInput("input", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(ZEROS)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    logits = client.infer("digits", [tensor], headers=headers).as_numpy("logits")
    assert logits is not None
    return logits


@pytest.mark.parametrize(
    ("token", "fragment"),
    [
        (None, "missing credentials: send header 'authorization: Bearer <token>'"),
        ("wrong-token", "invalid bearer token"),
        (f"{TOKEN}x", "invalid bearer token"),
    ],
)
def test_https_calls_without_a_valid_token_are_401(
    pki: Pki, tls_token_server: ServerThread, token: str | None, fragment: str
) -> None:
    context = client_context(pki)
    for method, path in [("POST", "/v2/models/digits/infer"), ("GET", "/v2/models/digits"), ("GET", "/v2")]:
        status, headers, body = https(tls_token_server, context, method, path, token=token)
        assert status == 401 and headers.get("WWW-Authenticate") == "Bearer", (path, status, body)
        assert fragment in json.loads(body)["error"], body
    # probes stay open, and the server goes on
    assert https(tls_token_server, context, "GET", "/v2/health/ready")[0] == 200
    assert https(tls_token_server, context, "POST", "/v2/models/digits/infer", token=TOKEN)[0] == 200


@GEVENT_HOSTNAME_CHECK
def test_https_with_the_ca_and_token_succeeds(pki: Pki, tls_token_server: ServerThread) -> None:
    status, _, body = https(tls_token_server, client_context(pki), "POST", "/v2/models/digits/infer", token=TOKEN)
    assert status == 200, body
    assert json.loads(body)["outputs"][0]["shape"] == [1, 10]
    client = triton_https(pki, tls_token_server)
    assert client.is_server_live()  # health needs no token
    assert triton_http_infer(client, TOKEN).shape == (1, 10)
    with pytest.raises(InferenceServerException) as info:
        triton_http_infer(client)
    assert info.value.status() == "401" and "missing credentials" in info.value.message()


def test_https_clients_that_do_not_trust_the_server_or_speak_plaintext_fail(
    pki: Pki, tls_token_server: ServerThread
) -> None:
    """The client refuses a certificate from a CA it does not trust; plain HTTP to the TLS port gets no answer."""
    error = https_refused(tls_token_server, client_context(pki, ca=pki.rogue_ca))
    assert isinstance(error, ssl.SSLCertVerificationError) and "certificate verify failed" in str(error)
    host, port = tls_token_server.http_address.split(":")
    plaintext = http.client.HTTPConnection(host, int(port), timeout=20)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        plaintext.request("GET", "/v2/health/ready")
        plaintext.getresponse().read()
    plaintext.close()
    assert https(tls_token_server, client_context(pki), "GET", "/v2/health/ready")[0] == 200


def tls_handshake(server: ServerThread, context: ssl.SSLContext) -> str:
    """Only the TLS handshake with the HTTP port, no request: the version agreed (ssl.SSLError if refused)."""
    host, port = server.http_address.split(":")
    with socket.create_connection((host, int(port)), timeout=20) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            return str(tls.version())


def tls12(context: ssl.SSLContext) -> ssl.SSLContext:
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


@GEVENT_HOSTNAME_CHECK
def test_https_mutual_tls_admits_only_clients_with_a_certificate_from_the_configured_ca(
    pki: Pki, mtls_server: ServerThread
) -> None:
    """No client certificate, or one from another CA: the server aborts the TLS handshake, and no HTTP status is
    ever sent. In TLS 1.2 the handshake itself fails; in TLS 1.3 the server checks the client's certificate
    after the client's side of the handshake is done, so the client sees the connection closed on its first
    read. The trusted client certificate gets through, with raw HTTPS and with tritonclient.http."""
    for client in (None, pki.rogue_client):
        with pytest.raises(ssl.SSLError):
            tls_handshake(mtls_server, tls12(client_context(pki, client=client)))
        error = https_refused(mtls_server, client_context(pki, client=client))
        assert not isinstance(error, ssl.SSLCertVerificationError), error  # the server refused, not the client
    trusted = client_context(pki, client=pki.client)
    assert tls_handshake(mtls_server, tls12(client_context(pki, client=pki.client))) == "TLSv1.2"
    assert tls_handshake(mtls_server, trusted) == "TLSv1.3"
    status, _, body = https(mtls_server, trusted, "POST", "/v2/models/digits/infer")
    assert status == 200, body
    assert triton_http_infer(triton_https(pki, mtls_server, client=pki.client)).shape == (1, 10)


# --- metrics on their own interface --------------------------------------------------------------


def test_metrics_bind_to_their_own_interface() -> None:
    """gRPC on 127.0.0.1, metrics on 127.0.0.2 only (both loopback on Linux)."""
    config = secured(ServerSettings(), metrics_host="127.0.0.2")
    with running_server(config) as server:
        port = server.server.metrics_port
        assert b"slimserve_requests" in urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=10).read()
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
