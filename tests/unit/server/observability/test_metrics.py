"""The server's metrics as exposed: deploy figures as plain gauges, no ``quantile`` label, no ``_created``.

tests/integration/test_metrics_lint.py runs ``promtool check metrics`` on a live server; this checks the
same rules without a server or a compression search.
"""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from compression.search.settings import CompressionSettings
from server.batching.batcher import BatchRecord
from server.observability.metrics import ServerMetrics


def exposed(metrics: ServerMetrics) -> dict[str, list]:
    text = generate_latest(metrics.registry).decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def used_metrics() -> ServerMetrics:
    metrics = ServerMetrics()
    metrics.requests.labels("digits", "original", "ModelInfer", "OK").inc()
    metrics.request_duration.labels("digits", "original", "ModelInfer").observe(0.002)
    metrics.record_batch(
        "digits", "original", BatchRecord(batch_size=4, requests=2, compute_seconds=0.001, succeeded=True)
    )
    metrics.shadow.rollbacks.labels("digits", "pruned").inc()
    figures = SimpleNamespace(latency_p50_ms=1.5, latency_p95_ms=4.0, top1=0.98, top1_drop=0.5, techniques=["x"])
    metrics.deploy.record("digits", "pruned", figures)
    budget = {"max_latency_ms": 50, "max_accuracy_drop": 1.0, "min_agreement": 0.9}
    metrics.deploy.record_budget("digits", CompressionSettings.model_validate({"budget": budget}))
    return metrics


def test_deploy_latency_percentiles_are_gauges_of_their_own() -> None:
    families = exposed(used_metrics())
    (p50,) = families["slimserve_deploy_latency_p50_seconds"]
    (p95,) = families["slimserve_deploy_latency_p95_seconds"]
    assert (p50.value, p95.value) == (0.0015, 0.004)
    assert p95.labels == {"model": "digits", "variant": "pruned"}
    (budget,) = families["slimserve_budget_latency_p95_seconds"]
    assert (budget.labels, budget.value) == ({"model": "digits"}, 0.05)


def test_no_quantile_label_and_no_created_series() -> None:
    families = exposed(used_metrics())
    samples = [s for family in families.values() for s in family]
    assert [s.name for s in samples if "quantile" in s.labels] == []
    assert [name for name in families if name.endswith("_created")] == []
    assert [s.name for s in samples if s.name.endswith("_created")] == []
    assert families["process_start_time_seconds"][0].value > 0  # restarts stay visible
