"""OpenTelemetry tracing (``server.tracing``), off by default; docs/operations.md, "Tracing".

A traced request has a server span (a child of the caller's W3C ``traceparent``, from gRPC metadata or
HTTP headers) with children ``decode`` (Classify's images), ``queue`` (submit to batch start, linked to
its batch) and ``response`` (model outputs to the response message); each forward pass is one
``forward`` span, a child of the first traced request in its batch and linked to every traced request
in it (server/batching/batcher.py).

Off costs nothing: :class:`Tracing` then holds no tracer, the transport checks ``plane.tracer is None``
once per request and creates no span, and the SDK and the exporter are not even imported. On, each
server has its own ``TracerProvider`` (not the process-wide one), so several servers in one process
(the tests) trace independently and ``stop`` flushes only its own. The compression search, which may
only use the OpenTelemetry API (``compression/`` does not import ``server``), reports to the
process-wide provider that :func:`process_tracing` installs for ``slimserve compress``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

import grpc
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

from server.config.settings import TracingSettings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("slimserve.tracing")

EXPORT_TIMEOUT_S = 5.0
"""Longest one export to the receiver may take, retries included (also bounds the flush at stop)."""
INSTRUMENTATION = "slimserve"

PROPAGATOR = TraceContextTextMapPropagator()
"""W3C Trace Context: ``traceparent`` and ``tracestate``."""
CARRIER_FIELDS = frozenset(PROPAGATOR.fields)

SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
"""gRPC codes that mark a server span as an error (semantic conventions: the others are the caller's)."""

# Attribute names: OpenTelemetry semantic conventions where one exists, ``slimserve.*`` otherwise.
MODEL = "slimserve.model"
VARIANT = "slimserve.variant"
METHOD = "slimserve.method"
"""The ``method`` label of the request metrics (``ModelInfer``, ``rest.Classify``...)."""
# slimserve.batch.size and slimserve.batch.requests: server/batching/batcher.py
IMAGES = "slimserve.images"


class Tracing:
    """One server's tracing: a tracer exporting over OTLP/gRPC when enabled, else nothing at all."""

    def __init__(self, settings: TracingSettings) -> None:
        self._provider: TracerProvider | None = None
        self.tracer: Tracer | None = None
        """None while tracing is off: the one thing the request path checks."""
        if settings.enabled:
            self._provider = build_provider(settings)
            self.tracer = self._provider.get_tracer(INSTRUMENTATION)
            log.info(
                "tracing: OTLP/gRPC to %s, sampling %g of new traces", settings.otlp_endpoint, settings.sampling_ratio
            )

    @property
    def enabled(self) -> bool:
        """A provider (and so an exporter) exists."""
        return self._provider is not None

    def shutdown(self) -> None:
        """Export what is buffered and stop (blocking: up to :data:`EXPORT_TIMEOUT_S` if the receiver is gone)."""
        self.tracer = None
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = None


def build_provider(settings: TracingSettings) -> TracerProvider:
    """A provider sampling ``ParentBased(TraceIdRatioBased(ratio))``, batching spans to the OTLP/gRPC exporter."""
    # NOTE: imported here so that a server with tracing off never loads the SDK or the exporter.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    from server import __version__

    resource = Resource.create({SERVICE_NAME: settings.service_name, SERVICE_VERSION: __version__})
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(settings.sampling_ratio)), resource=resource)
    exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint, timeout=EXPORT_TIMEOUT_S)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


@contextmanager
def process_tracing(settings: TracingSettings) -> Iterator[None]:
    """For a one-shot command (``slimserve compress``): make ``settings``' provider the process-wide one, so
    that code using only the API (``trace.get_tracer(__name__)``, the compression search) is exported;
    flushed on exit. Does nothing when tracing is off."""
    if not settings.enabled:
        yield
        return
    provider = build_provider(settings)
    trace.set_tracer_provider(provider)
    try:
        yield
    finally:
        provider.shutdown()


def server_span(tracer: Tracer, name: str, carrier: Mapping[str, str], attributes: Attributes) -> Span | None:
    """Start a request's server span, a child of the caller's ``traceparent`` in ``carrier`` if any; None when
    the sampler drops it (then nothing else is traced for the request)."""
    parent = PROPAGATOR.extract(carrier) if carrier else None
    span = tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
    return span if span.is_recording() else None


def grpc_carrier(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    """The trace context entries of gRPC invocation metadata (``(key, value)`` pairs, keys lower case)."""
    if not metadata:
        return {}
    return {key: value for key, value in metadata if key in CARRIER_FIELDS and isinstance(value, str)}


def end_server_span(span: Span, code: grpc.StatusCode, message: str = "", http_status: int | None = None) -> None:
    """Record the outcome (gRPC: code name and number; REST: HTTP status) and end the span."""
    if http_status is None:
        span.set_attribute("rpc.response.status_code", code.name)
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        failed = code in SERVER_ERROR_CODES
    else:
        span.set_attribute("http.response.status_code", http_status)
        failed = http_status >= 500
    if failed:
        span.set_status(Status(StatusCode.ERROR, message or code.name))
    span.end()


def child_span(
    tracer: Tracer,
    parent: Span,
    name: str,
    start_s: float,
    end_s: float,
    attributes: Attributes = None,
    links: list[trace.Link] | None = None,
) -> None:
    """Record a finished child of ``parent`` from ``start_s`` to ``end_s`` (``time.perf_counter()`` seconds)."""
    offset = time.time_ns() - time.perf_counter_ns()
    span = tracer.start_span(
        name,
        context=trace.set_span_in_context(parent),
        attributes=attributes,
        links=links,
        start_time=offset + int(start_s * 1e9),
    )
    span.end(end_time=offset + int(end_s * 1e9))
