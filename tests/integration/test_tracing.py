"""OpenTelemetry tracing against a real OTLP/gRPC receiver on loopback: the span tree of real requests.

The receiver implements ``opentelemetry.proto.collector.trace.v1.TraceService/Export`` (the generated code
of the ``opentelemetry-proto`` package, which the exporter depends on) and keeps every export request;
the server exports to it as it would to an OpenTelemetry Collector or Jaeger, and flushes on stop.
"""

from __future__ import annotations

import json
import queue
import secrets
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import yaml
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from compression.models.digits.data import encode_png, load_splits, normalize
from compression.search.settings import CompressionSettings
from protos import classifier_pb2, classifier_pb2_grpc
from server.config.settings import DeployConfig, TracingSettings
from tests import REPO_ROOT
from tests.compressed_digits import digits_config, seed_trained_digits
from tests.conftest import digits_without_compression
from tests.serving import running_server, sample_value, scrape

CONCURRENT = 8
INFER = "inference.GRPCInferenceService/ModelInfer"
CLASSIFY = "slimserve.v1.Classifier/Classify"
REST_INFER = "POST /v2/models/{model}/infer"


@dataclass
class Collected:
    """One exported span, with ids as hex strings and attributes as Python values."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, Any]
    links: list[tuple[str, str]]
    """(trace id, span id) of each link."""
    status: int
    service: str
    children: list[Collected] = field(default_factory=list)


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps every ``ExportTraceServiceRequest``."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._lock = threading.Lock()
        self.port = 0

    def Export(  # noqa: N802 - the gRPC method's name
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spans(self) -> list[Collected]:
        with self._lock:
            requests = list(self.requests)
        collected = []
        for request in requests:
            for resource_spans in request.resource_spans:
                service = _attributes(resource_spans.resource.attributes).get("service.name", "")
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        collected.append(
                            Collected(
                                span.name,
                                span.trace_id.hex(),
                                span.span_id.hex(),
                                span.parent_span_id.hex(),
                                span.kind,
                                _attributes(span.attributes),
                                [(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                                span.status.code,
                                service,
                            )
                        )
        by_id = {span.span_id: span for span in collected}
        for span in collected:
            if span.parent_id in by_id:
                by_id[span.parent_id].children.append(span)
        return collected


@contextmanager
def otlp_receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    receiver.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield receiver
    finally:
        server.stop(None)


def traced_digits(receiver: Receiver, enabled: bool = True) -> DeployConfig:
    """Digits (no compression) batching concurrent requests, tracing everything to ``receiver``."""
    config = digits_without_compression()
    models = [
        m.model_copy(update={"batching": m.batching.model_copy(update={"max_queue_delay_ms": 50})})
        for m in config.models
    ]
    tracing = TracingSettings(enabled=enabled, otlp_endpoint=receiver.endpoint, sampling_ratio=1.0)
    server = config.server.model_copy(update={"tracing": tracing})
    return config.model_copy(update={"server": server, "models": models})


def traceparent() -> tuple[str, str, str]:
    """A caller's sampled W3C ``traceparent``, with its trace id and span id."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def infer_input(image: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("input", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(image)
    return tensor


def rest_infer(address: str, image: np.ndarray, header: str) -> int:
    body = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": image.ravel().tolist()}]}
    request = urllib.request.Request(
        f"http://{address}/v2/models/digits/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "traceparent": header},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return int(response.status)


def the_one(spans: list[Collected], **match: str) -> Collected:
    found = [s for s in spans if all(getattr(s, key) == value for key, value in match.items())]
    assert len(found) == 1, f"{len(found)} spans match {match}: {[s.name for s in found]}"
    return found[0]


def test_request_spans_batches_and_links_reach_an_otlp_receiver() -> None:
    images = normalize(load_splits()["test"].images[:CONCURRENT])
    callers = [traceparent() for _ in range(CONCURRENT)]
    with otlp_receiver() as receiver:
        with running_server(traced_digits(receiver)) as server:
            assert server.server.plane.tracer is not None
            client = triton.InferenceServerClient(server.address)
            start = threading.Barrier(CONCURRENT)

            def one(i: int) -> None:
                start.wait()
                client.infer("digits", [infer_input(images[i : i + 1])], headers={"traceparent": callers[i][0]})

            with ThreadPoolExecutor(max_workers=CONCURRENT) as pool:
                list(pool.map(one, range(CONCURRENT)))

            rest_header, rest_trace, rest_parent = traceparent()
            assert rest_infer(server.http_address, images[:1], rest_header) == 200

            classify_header, classify_trace, classify_parent = traceparent()
            channel = grpc.insecure_channel(server.address)
            classifier = classifier_pb2_grpc.ClassifierStub(channel)
            pngs = [encode_png(image) for image in load_splits()["test"].images[:3]]
            classifier.Classify(
                classifier_pb2.ClassifyRequest(model_name="digits", images=pngs, top_k=2),
                metadata=[("traceparent", classify_header)],
            )
            stream_header, stream_trace, stream_parent = traceparent()
            answers: queue.Queue[object] = queue.Queue()
            client.start_stream(
                lambda result, error: answers.put(error or result), headers={"traceparent": stream_header}
            )
            for i in range(2):
                client.async_stream_infer("digits", [infer_input(images[i : i + 1])])
            assert all(not isinstance(answers.get(timeout=30), Exception) for _ in range(2))
            client.stop_stream()

            missing_header, missing_trace, missing_parent = traceparent()
            with pytest.raises(triton.InferenceServerException):
                client.infer("nope", [infer_input(images[:1])], headers={"traceparent": missing_header})
            channel.close()
            passes = sample_value(
                scrape(server)["slimserve_batch_size"], "slimserve_batch_size_count", model="digits", variant="original"
            )
        spans = receiver.spans()  # the server flushed its spans on stop

    assert spans and {s.service for s in spans} == {"slimserve"}
    forwards = {s.span_id: s for s in spans if s.name == "forward"}
    assert len(forwards) == passes, "exactly one forward span per batch (forward pass)"

    requests = []
    for header, trace_id, parent_id in callers:
        request = the_one(spans, name=INFER, trace_id=trace_id)
        assert request.parent_id == parent_id  # a child of the caller's span
        assert request.kind == trace_pb2.Span.SPAN_KIND_SERVER
        assert request.attributes["rpc.system"] == "grpc"
        assert request.attributes["rpc.service"] == "inference.GRPCInferenceService"
        assert request.attributes["rpc.method"] == "ModelInfer"
        assert request.attributes["rpc.response.status_code"] == "OK"
        assert request.attributes["rpc.grpc.status_code"] == 0
        assert request.attributes["slimserve.model"] == "digits"
        assert request.attributes["slimserve.variant"] == "original"
        children = {child.name: child for child in request.children}
        assert {"queue", "response"} <= set(children) <= {"queue", "response", "forward"}
        queued = children["queue"]
        assert len(queued.links) == 1, "the queue span links to the batch that served the request"
        batch = forwards[queued.links[0][1]]
        assert (request.trace_id, request.span_id) in batch.links, "the batch links back to each request"
        assert request.attributes["slimserve.batch.size"] == batch.attributes["slimserve.batch.size"]
        assert queued.attributes["slimserve.batch.size"] == batch.attributes["slimserve.batch.size"]
        requests.append(request)

    for batch in forwards.values():
        assert batch.attributes["slimserve.model"] == "digits" and batch.attributes["slimserve.variant"] == "original"
        assert batch.attributes["slimserve.batch.requests"] == len(batch.links)
        assert batch.attributes["slimserve.batch.size"] >= len(batch.links)  # rows: Classify sends 3 in one request
        parent = next(s for s in spans if s.span_id == batch.parent_id)  # a child of its first request
        assert (parent.trace_id, parent.span_id) in batch.links
    assert any(b.attributes["slimserve.batch.requests"] > 1 for b in forwards.values()), (
        "no two requests shared a batch"
    )

    rest = the_one(spans, name=REST_INFER, trace_id=rest_trace)
    assert rest.parent_id == rest_parent and rest.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert rest.attributes["http.request.method"] == "POST"
    assert rest.attributes["http.route"] == "/v2/models/{model}/infer"
    assert rest.attributes["http.response.status_code"] == 200
    assert rest.attributes["slimserve.method"] == "rest.ModelInfer"
    assert rest.attributes["slimserve.variant"] == "original"
    assert {"queue", "response"} <= {child.name for child in rest.children}

    classify = the_one(spans, name=CLASSIFY, trace_id=classify_trace)
    assert classify.parent_id == classify_parent and classify.attributes["rpc.method"] == "Classify"
    decode = next(child for child in classify.children if child.name == "decode")
    assert decode.attributes["slimserve.images"] == 3
    assert {"decode", "queue", "response"} <= {child.name for child in classify.children}

    streamed = [s for s in spans if s.trace_id == stream_trace and s.name.endswith("/ModelStreamInfer")]
    assert len(streamed) == 2, "a span per request on the stream, each a child of the stream's traceparent"
    assert all(s.parent_id == stream_parent and s.attributes["rpc.method"] == "ModelStreamInfer" for s in streamed)
    assert all({"queue", "response"} <= {child.name for child in s.children} for s in streamed)

    missing = the_one(spans, name=INFER, trace_id=missing_trace)
    assert missing.parent_id == missing_parent
    assert missing.attributes["rpc.response.status_code"] == "NOT_FOUND"
    assert missing.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert "slimserve.model" not in missing.attributes and not missing.children
    assert missing.status == trace_pb2.Status.STATUS_CODE_UNSET  # the caller's mistake, not a server error


def test_tracing_off_creates_no_exporter_and_sends_nothing() -> None:
    images = normalize(load_splits()["test"].images[:4])
    with otlp_receiver() as receiver:
        with running_server(traced_digits(receiver, enabled=False)) as server:
            assert server.server.plane.tracer is None and server.server.tracing.tracer is None
            assert not server.server.tracing.enabled  # no provider, no exporter
            client = triton.InferenceServerClient(server.address)
            for i in range(4):
                client.infer("digits", [infer_input(images[i : i + 1])], headers={"traceparent": traceparent()[0]})
            assert rest_infer(server.http_address, images[:1], traceparent()[0]) == 200
        assert receiver.requests == []


@pytest.mark.slow
def test_compress_command_traces_each_candidate(tmp_path: Path) -> None:
    """``slimserve compress`` with ``server.tracing`` on: a span per candidate, with build, latency, fidelity."""
    seed_trained_digits(tmp_path)
    config = digits_config(tmp_path)
    model = config.models[0]
    assert model.compression is not None
    candidates = [{"name": "fp32-eager", "realization": {"runtime": "eager", "precision": "fp32"}}]
    compression = CompressionSettings.model_validate({**model.compression.model_dump(), "candidates": candidates})
    with otlp_receiver() as receiver:
        tracing = TracingSettings(enabled=True, otlp_endpoint=receiver.endpoint, service_name="slimserve-compress")
        config = config.model_copy(
            update={
                "models": [model.model_copy(update={"compression": compression})],
                "server": config.server.model_copy(update={"tracing": tracing}),
            }
        )
        path = tmp_path / "deploy.yaml"
        path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
        command = [sys.executable, "-m", "server.cli", "compress", "--config", str(path), "--log-level", "WARNING"]
        subprocess.run(command, cwd=REPO_ROOT, check=True, timeout=900)
        spans = receiver.spans()

    search = the_one(spans, name="compression.search")
    assert search.service == "slimserve-compress" and search.parent_id == ""
    assert search.attributes["slimserve.model"] == "digits"
    assert search.attributes["slimserve.chosen"] in ("original", "fp32-eager")
    by_name = {child.name: child for child in search.children}
    assert set(by_name) == {"candidate original", "candidate fp32-eager"}
    candidate = by_name["candidate fp32-eager"]
    assert {child.name for child in candidate.children} == {"build", "latency", "fidelity"}
    assert candidate.attributes["slimserve.realization.runtime"] == "eager"
    assert candidate.attributes["slimserve.latency_p95_ms"] > 0 and 0 <= candidate.attributes["slimserve.agreement"]
    assert {child.name for child in by_name["candidate original"].children} == {"latency", "fidelity"}
