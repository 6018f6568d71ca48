"""Prometheus metrics, labelled by ``model`` and ``variant`` so original and compressed compare side by side.

Collectors live in an injected ``CollectorRegistry`` (one per server), never in the global one. The
exposition passes ``promtool check metrics`` with no finding (tests/integration/test_metrics_lint.py):
a label called ``quantile`` is for summaries only, so the deploy-time latency percentiles are gauges
of their own (``..._p50_seconds``, ``..._p95_seconds``). Counters and histograms export no ``<name>_created``
series (see :class:`ServerMetrics`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from compression.search.settings import CompressionSettings
from server.batching.batcher import BatchRecord

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
DIVERGENCE_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
VARIANT = ("model", "variant")
PAIR = ("model", "variant", "shadow_variant")
"""A shadow comparison: the variant that answered the caller, and the one it was compared with."""


class ServerMetrics:
    """Every slimserve series, on ``registry`` (a new one by default).

    NOTE: prometheus_client's ``<name>_created`` series (the time a labelled counter or histogram was
    first used) carry nothing here: a restart shows as the counters' reset and as
    ``process_start_time_seconds``, exported below. They are switched off with
    ``disable_created_metrics()``, a process-wide setting read at each scrape, as is the
    ``PROMETHEUS_DISABLE_CREATED_SERIES`` variable that sets it.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_start_time_seconds, CPU, memory, open fds (Linux /proc)
        self.requests = Counter(
            "slimserve_requests",
            "Inference requests by outcome (gRPC status code name).",
            [*VARIANT, "method", "code"],
            registry=r,
        )
        self.policy_decisions = Counter(
            "slimserve_policy_decisions",
            "Variants chosen by the serving policy for requests that name none, with the reason "
            "(policy, no_compressed, guardrail, slo_ok, slo_risk, hold); only for the original and adaptive policies.",
            [*VARIANT, "reason"],
            registry=r,
        )
        self.serving_slo = Gauge(
            "slimserve_serving_slo_seconds",
            "The latency objective (p95) that the adaptive serving policy keeps.",
            ["model"],
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
        self.shadow = ShadowMetrics(r)
        self.variant_info = Info(
            "slimserve_variant", "Each loaded variant's Triton version number and device.", VARIANT, registry=r
        )
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


class ShadowMetrics:
    """Live agreement between the variant that answered and the other one, plus the guardrail's state."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.comparisons = Counter(
            "slimserve_shadow_comparisons",
            "Images run on both variants, by whether their top-1 classes agree (result = agree|disagree).",
            [*PAIR, "result"],
            registry=r,
        )
        self.divergence = Histogram(
            "slimserve_shadow_divergence",
            "Jensen-Shannon divergence (bits, 0..1) between the two variants' output distributions, per image.",
            PAIR,
            buckets=DIVERGENCE_BUCKETS,
            registry=r,
        )
        self.dropped = Counter(
            "slimserve_shadow_dropped",
            "Sampled requests not compared: reason = busy (shadow queue full) or error (the shadow run failed).",
            ["model", "reason"],
            registry=r,
        )
        self.pending = Gauge(
            "slimserve_shadow_pending", "Sampled requests waiting for an idle model.", ["model"], registry=r
        )
        self.window_agreement = Gauge(
            "slimserve_guardrail_window_agreement_ratio",
            "Top-1 agreement between original and compressed over the guardrail's window of compared images.",
            ["model"],
            registry=r,
        )
        self.window_samples = Gauge(
            "slimserve_guardrail_window_samples", "Compared images in the guardrail's window.", ["model"], registry=r
        )
        self.min_agreement = Gauge(
            "slimserve_guardrail_min_agreement_ratio",
            "The guardrail's threshold: below it, the server rolls back to the original.",
            ["model"],
            registry=r,
        )
        self.rollbacks = Counter(
            "slimserve_guardrail_rollbacks",
            "Automatic switches back to the original because live agreement fell below the threshold.",
            VARIANT,
            registry=r,
        )
        self.pinned = Gauge(
            "slimserve_variant_pinned",
            "1 while an operator pins the model's default variant (the guardrail then does not switch).",
            ["model"],
            registry=r,
        )


class DeployFigures:
    """What the compression search measured at deploy time, one series per variant, for side-by-side panels.

    Ratios ops care about (speed-up, size ratio) are ``original / compressed`` divisions in PromQL.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, VARIANT, registry=registry)

        self.latency_p50 = gauge(
            "slimserve_deploy_latency_p50_seconds", "Median latency the search measured at the budget's batch size."
        )
        self.latency_p95 = gauge(
            "slimserve_deploy_latency_p95_seconds", "p95 latency the search measured at the budget's batch size."
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
        self.budget_latency_p95 = Gauge(
            "slimserve_budget_latency_p95_seconds",
            "The deploy config's latency budget: the largest allowed p95 at the budget's batch size.",
            ["model"],
            registry=registry,
        )
        self.budget_top1_drop = Gauge(
            "slimserve_budget_max_top1_drop_ratio",
            "The deploy config's largest allowed top-1 drop.",
            ["model"],
            registry=registry,
        )
        self.budget_agreement = Gauge(
            "slimserve_budget_min_agreement_ratio",
            "The deploy config's smallest allowed agreement with the original.",
            ["model"],
            registry=registry,
        )

    def record_budget(self, model: str, compression: CompressionSettings) -> None:
        budget = compression.budget
        if budget.max_latency_ms is not None:
            self.budget_latency_p95.labels(model).set(budget.max_latency_ms / 1000)
        if budget.max_accuracy_drop is not None:
            self.budget_top1_drop.labels(model).set(budget.max_accuracy_drop / 100)
        if budget.min_agreement is not None:
            self.budget_agreement.labels(model).set(budget.min_agreement)

    def record(self, model: str, variant: str, figures: object) -> None:
        """``figures`` is a ``compression.search.runner.VariantReport``; missing figures leave no series."""
        drop = getattr(figures, "top1_drop", None)
        values = {
            self.top1: getattr(figures, "top1", None),
            self.agreement: getattr(figures, "agreement", None),
            self.parameters: getattr(figures, "params", None),
            self.macs: getattr(figures, "macs", None),
            self.size: getattr(figures, "size_bytes", None),
            self.latency_p50: _ms_to_s(getattr(figures, "latency_p50_ms", None)),
            self.latency_p95: _ms_to_s(getattr(figures, "latency_p95_ms", None)),
            self.top1_drop: None if drop is None else drop / 100,
        }
        for gauge, value in values.items():
            if value is not None:
                gauge.labels(model, variant).set(value)
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
