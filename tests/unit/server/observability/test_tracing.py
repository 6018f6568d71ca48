"""``server/observability/tracing.py``: off means no provider; the caller's ``traceparent`` parents the server
span; sampling; the status a span ends with."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode

from server.config.settings import ServerSettings, TracingSettings
from server.observability.tracing import Tracing, child_span, end_server_span, grpc_carrier, server_span

TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def recorder(ratio: float = 1.0) -> tuple[InMemorySpanExporter, trace.Tracer]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter, provider.get_tracer("test")


def test_tracing_is_off_by_default_and_then_holds_no_tracer() -> None:
    assert ServerSettings().tracing == TracingSettings(enabled=False)
    tracing = Tracing(TracingSettings())
    assert tracing.tracer is None and not tracing.enabled
    tracing.shutdown()  # nothing to flush


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        TracingSettings(sampling_ratio=1.5)
    with pytest.raises(ValueError):
        TracingSettings.model_validate({"enabled": True, "endpoint": "x"})  # unknown field


def test_enabled_tracing_has_a_tracer_until_shutdown() -> None:
    # NOTE: nothing listens on port 9 (discard); no span is made, so nothing is sent and shutdown is quick.
    tracing = Tracing(TracingSettings(enabled=True, otlp_endpoint="http://127.0.0.1:9"))
    assert tracing.enabled and tracing.tracer is not None
    tracing.shutdown()
    assert tracing.tracer is None and not tracing.enabled


def test_the_callers_traceparent_parents_the_server_span() -> None:
    exporter, tracer = recorder()
    carrier = grpc_carrier([("traceparent", TRACEPARENT), ("authorization", "Bearer x"), ("x-bin", b"\0")])
    assert carrier == {"traceparent": TRACEPARENT}
    span = server_span(tracer, "svc/Method", carrier, {"rpc.method": "Method"})
    assert span is not None
    end_server_span(span, grpc.StatusCode.OK)
    (finished,) = exporter.get_finished_spans()
    assert isinstance(finished, ReadableSpan) and finished.kind is SpanKind.SERVER
    assert finished.context is not None and format(finished.context.trace_id, "032x") == TRACE_ID
    assert finished.parent is not None and format(finished.parent.span_id, "016x") == PARENT_ID
    assert finished.attributes is not None
    assert finished.attributes["rpc.response.status_code"] == "OK" and finished.attributes["rpc.grpc.status_code"] == 0


def test_without_traceparent_the_ratio_decides_and_an_unsampled_request_is_not_traced() -> None:
    exporter, tracer = recorder(ratio=0.0)
    assert server_span(tracer, "svc/Method", {}, None) is None
    unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00"
    assert server_span(tracer, "svc/Method", {"traceparent": unsampled}, None) is None
    sampled = server_span(tracer, "svc/Method", {"traceparent": TRACEPARENT}, None)  # the caller decides
    assert sampled is not None
    assert exporter.get_finished_spans() == ()


@pytest.mark.parametrize(
    ("code", "http_status", "error"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, None, False),
        (grpc.StatusCode.NOT_FOUND, None, False),
        (grpc.StatusCode.INTERNAL, None, True),
        (grpc.StatusCode.UNAVAILABLE, None, True),
        (grpc.StatusCode.INVALID_ARGUMENT, 400, False),
        (grpc.StatusCode.INTERNAL, 500, True),
    ],
)
def test_server_errors_mark_the_span_caller_errors_do_not(
    code: grpc.StatusCode, http_status: int | None, error: bool
) -> None:
    exporter, tracer = recorder()
    span = server_span(tracer, "x", {}, None)
    assert span is not None
    end_server_span(span, code, "why", http_status)
    (finished,) = exporter.get_finished_spans()
    assert (finished.status.status_code is StatusCode.ERROR) == error
    assert finished.attributes is not None
    if http_status is None:
        assert finished.attributes["rpc.response.status_code"] == code.name
    else:
        assert finished.attributes["http.response.status_code"] == http_status
        assert "rpc.response.status_code" not in finished.attributes


def test_child_spans_take_perf_counter_times() -> None:
    exporter, tracer = recorder()
    parent = server_span(tracer, "x", {}, None)
    assert parent is not None
    child_span(tracer, parent, "queue", 100.0, 100.25, {"a": 1})
    (child,) = exporter.get_finished_spans()
    assert child.parent is not None and child.parent.span_id == parent.get_span_context().span_id
    assert child.start_time is not None and child.end_time is not None
    assert child.end_time - child.start_time == pytest.approx(250_000_000, abs=1_000)
