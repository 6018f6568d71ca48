"""Prometheus metrics, labelled by ``model`` and ``variant`` so original and compressed compare side by side.

Collectors live in an injected ``CollectorRegistry`` (one per server), never in the global one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from server.batching import BatchRecord

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
VARIANT = ("model", "variant")


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "slimserve_requests",
            "Inference requests by outcome (gRPC status code name).",
            [*VARIANT, "method", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "slimserve_request_duration_seconds",
            "Time from receiving a request to sending its response.",
            [*VARIANT, "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "slimserve_queue_duration_seconds",
            "Time a request waited for its batch to start.",
            VARIANT,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_duration = Histogram(
            "slimserve_compute_duration_seconds",
            "Time of one batched forward pass (assembly included).",
            VARIANT,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "slimserve_batch_size",
            "Rows per forward pass.",
            VARIANT,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.inferences = Counter(
            "slimserve_inferences",
            "Rows (images) run through the model.",
            VARIANT,
            registry=r,
        )
        self.inflight = Gauge(
            "slimserve_inflight_requests",
            "Requests received and not yet answered.",
            VARIANT,
            registry=r,
        )
        self.load_seconds = Gauge(
            "slimserve_model_load_duration_seconds",
            "Time to load (and warm up) a model variant.",
            VARIANT,
            registry=r,
        )
        self.deploy = DeployFigures(r)
        self.active = Gauge(
            "slimserve_variant_active",
            "1 for the variant that answers requests by default, else 0.",
            VARIANT,
            registry=r,
        )

    def record_batch(self, model: str, variant: str, record: BatchRecord) -> None:
        self.batch_size.labels(model, variant).observe(record.batch_size)
        self.compute_duration.labels(model, variant).observe(record.compute_seconds)
        if record.succeeded:
            self.inferences.labels(model, variant).inc(record.batch_size)

    @contextmanager
    def track_inflight(self, model: str, variant: str) -> Iterator[None]:
        gauge = self.inflight.labels(model, variant)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    def set_active(self, model: str, variants: list[str], active: str) -> None:
        for variant in variants:
            self.active.labels(model, variant).set(1 if variant == active else 0)


class DeployFigures:
    """What the compression search measured at deploy time, one series per variant, for side-by-side panels.

    Ratios ops care about (speed-up, size ratio) are ``original / compressed`` divisions in PromQL.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, [*VARIANT, *extra], registry=registry)

        self.latency = gauge(
            "slimserve_deploy_latency_seconds",
            "Latency measured by the search at the budget's batch size, by quantile (0.5, 0.95).",
            ("quantile",),
        )
        self.top1 = gauge("slimserve_deploy_top1_ratio", "Top-1 accuracy on the held-out validation split.")
        self.top1_drop = gauge("slimserve_deploy_top1_drop_ratio", "Top-1 of the original minus this variant's.")
        self.agreement = gauge(
            "slimserve_deploy_agreement_ratio", "Share of top-1 predictions equal to the original's."
        )
        self.parameters = gauge("slimserve_deploy_parameters", "Parameter count.")
        self.macs = gauge("slimserve_deploy_macs", "Multiply-accumulates per image.")
        self.size = gauge("slimserve_deploy_size_bytes", "Size of the served artifact (original: its state_dict).")
        self.info = Info(
            "slimserve_deploy_variant", "The chain of techniques of each variant.", VARIANT, registry=registry
        )

    def record(self, model: str, variant: str, figures: object) -> None:
        """``figures`` is a ``compression.search.VariantReport``; missing figures leave no series."""
        values = {
            (self.top1, ()): getattr(figures, "top1", None),
            (self.agreement, ()): getattr(figures, "agreement", None),
            (self.parameters, ()): getattr(figures, "params", None),
            (self.macs, ()): getattr(figures, "macs", None),
            (self.size, ()): getattr(figures, "size_bytes", None),
            (self.latency, ("0.5",)): _ms_to_s(getattr(figures, "latency_p50_ms", None)),
            (self.latency, ("0.95",)): _ms_to_s(getattr(figures, "latency_p95_ms", None)),
        }
        drop = getattr(figures, "top1_drop", None)
        values[(self.top1_drop, ())] = None if drop is None else drop / 100
        for (gauge, extra), value in values.items():
            if value is not None:
                gauge.labels(model, variant, *extra).set(value)
        self.info.labels(model, variant).info({"techniques": " -> ".join(getattr(figures, "techniques", []))})


def _ms_to_s(value: float | None) -> float | None:
    return None if value is None else value / 1000


class MetricsEndpoint:
    """The HTTP ``/metrics`` endpoint, on its own thread."""

    def __init__(self, metrics: ServerMetrics, host: str, port: int) -> None:
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, addr=host, registry=metrics.registry)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
