"""Access control for the gRPC port: TLS / mutual TLS credentials and bearer-token auth.

Tokens are compared in constant time (``hmac.compare_digest``, against every configured token, so
the time taken does not tell which one nearly matched). ``grpc.health.v1`` stays open for probes;
every other service, server reflection included, needs ``authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import logging
import os
import ssl
from collections.abc import Sequence
from pathlib import Path

import grpc

from server.config.settings import AuthSettings, ConfigError, ServerSettings, TlsSettings
from server.transport.interceptors import Continuation, MalformedRequestInterceptor, refusing

log = logging.getLogger("slimserve.security")

OPEN_SERVICES = ("grpc.health.v1.Health",)
"""Services any caller may use: probes must work without credentials."""
AUTHORIZATION = "authorization"
SCHEME = "bearer"


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials:
    """TLS credentials for ``add_secure_port``; with ``client_ca_file`` clients must present a certificate."""
    assert tls.cert_file is not None and tls.key_file is not None
    cert = _read("server.tls.cert_file", tls.cert_file)
    key = _read("server.tls.key_file", tls.key_file)
    client_ca = _read("server.tls.client_ca_file", tls.client_ca_file) if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def load_tokens(auth: AuthSettings) -> list[bytes]:
    """Every accepted token, from ``tokens_file`` and ``tokens_env``; at least one, or ConfigError."""
    tokens: list[str] = []
    if auth.tokens_file is not None:
        text = _read("server.auth.tokens_file", auth.tokens_file).decode("utf-8", errors="replace")
        lines = [line.strip() for line in text.splitlines()]
        tokens += [line for line in lines if line and not line.startswith("#")]
    if auth.tokens_env is not None:
        tokens += [t.strip() for t in os.environ.get(auth.tokens_env, "").split(",") if t.strip()]
    if not tokens:
        sources = [f"file {auth.tokens_file}"] if auth.tokens_file else []
        sources += [f"${auth.tokens_env}"] if auth.tokens_env else []
        raise ConfigError(
            f"server.auth: no tokens found in {' or '.join(sources)}; add at least one token "
            "(one per line in the file, comma-separated in the environment variable) or remove server.auth"
        )
    return [token.encode() for token in tokens]


class BearerTokens:
    """The accepted tokens, and the check of an ``authorization`` value (gRPC metadata or HTTP header)."""

    def __init__(self, tokens: Sequence[bytes]) -> None:
        self._tokens = list(tokens)

    def problem(self, value: str | bytes | None, carrier: str = "metadata") -> str | None:
        """None when ``value`` is ``Bearer <an accepted token>``, else what is wrong with it; ``carrier``
        names what carries it in the message (gRPC ``metadata``, an HTTP ``header``)."""
        if value is None:
            return f"missing credentials: send {carrier} 'authorization: Bearer <token>'"
        text = value if isinstance(value, str) else value.decode("latin-1")
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() != SCHEME or not token.strip():
            return f"malformed authorization {carrier}: expected 'Bearer <token>'"
        offered = token.strip().encode()
        # NOTE: compare with every token, no early exit: timing says nothing about which one was close.
        matches = [hmac.compare_digest(offered, accepted) for accepted in self._tokens]
        return None if any(matches) else "invalid bearer token"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid ``authorization: Bearer <token>`` with UNAUTHENTICATED."""

    def __init__(self, tokens: BearerTokens) -> None:
        self._tokens = tokens

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.lstrip("/").split("/")[0] in OPEN_SERVICES:
            return handler
        problem = self._check(handler_call_details.invocation_metadata or ())
        if problem is None:
            return handler
        log.debug("refused %s: %s", method, problem)
        return refusing(handler, grpc.StatusCode.UNAUTHENTICATED, problem)

    def _check(self, metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
        """None when the call carries an accepted token, else what is wrong with it."""
        values = [value for key, value in metadata if key == AUTHORIZATION]
        return self._tokens.problem(values[0] if values else None)


def ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """The HTTP port's TLS settings, the same files and client-certificate rule as the gRPC port's."""
    assert tls.cert_file is not None and tls.key_file is not None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
        if tls.client_ca_file is not None:
            context.load_verify_locations(cafile=tls.client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"server.tls: cannot use {tls.cert_file} / {tls.key_file}: {exc}") from exc
    return context


def _read(field: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path}: {exc.strerror}; fix the path or its permissions") from exc


def server_interceptors(settings: ServerSettings) -> list[grpc.aio.ServerInterceptor]:
    """Token auth (when configured) first, so refused calls cost nothing more; then message parsing."""
    chain: list[grpc.aio.ServerInterceptor] = []
    if settings.auth.enabled:
        chain.append(BearerTokenInterceptor(BearerTokens(load_tokens(settings.auth))))
        log.info("bearer-token auth on every service but %s", ", ".join(OPEN_SERVICES))
    chain.append(MalformedRequestInterceptor())
    return chain


def add_port(server: grpc.aio.Server, address: str, tls: TlsSettings) -> int:
    """Listen on ``address``, over TLS when configured; returns the bound port (0 when binding failed)."""
    if not tls.enabled:
        return server.add_insecure_port(address)
    log.info("gRPC over TLS%s", " with client certificates required (mutual TLS)" if tls.client_ca_file else "")
    return server.add_secure_port(address, server_credentials(tls))
