"""`promtool check metrics` on a live server's /metrics finds nothing, and no `_created` series is exposed.

The server serves digits with a real compressed variant (a one-candidate search), shadows every request
and has answered good and failing requests, so every family it registers has samples when it is
scraped. The GPU families are added with the fake NVML and torch of the GPU metrics unit tests, as a
server on CUDA exports them.
"""

from __future__ import annotations

import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families

from compression.models.digits.data import load_splits, normalize
from server.config.settings import ServingSettings, ShadowSettings
from server.observability.gpu_metrics import GpuCollector
from tests.compressed_digits import CHOSEN, digits_config, seed_trained_digits
from tests.serving import ServerThread, running_server
from tests.unit.server.observability.test_gpu_metrics import FakeInfo, FakeNvml

pytestmark = pytest.mark.slow

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
CREATED = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*_created\b", re.MULTILINE)
EXPECTED = {
    "slimserve_requests",
    "slimserve_request_duration_seconds",
    "slimserve_deploy_latency_p50_seconds",
    "slimserve_deploy_latency_p95_seconds",
    "slimserve_budget_latency_p95_seconds",
    "slimserve_budget_min_agreement_ratio",
    "slimserve_shadow_comparisons",
    "slimserve_shadow_divergence",
    "slimserve_gpu_memory_used_bytes",
    "slimserve_gpu_torch_reserved_bytes",
    "process_start_time_seconds",
}
"""A sample of the families the scrape must hold (the lint is only as good as the series it sees)."""


@pytest.fixture(scope="module")
def promtool() -> str:
    subprocess.run(["bash", str(PROMETHEUS_DIR / "ensure-prometheus.sh")], check=True, timeout=600)
    return "promtool"


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The /metrics text of a server with a compressed variant, after good and failing requests."""
    cache = tmp_path_factory.mktemp("cache")
    seed_trained_digits(cache)
    # NOTE: the adaptive policy with an objective, so that its decision and objective families have samples too
    serving = ServingSettings(policy="adaptive", slo_p95_ms=50)
    config = digits_config(cache, shadow=ShadowSettings(fraction=1.0), serving=serving)
    (model,) = config.models
    assert model.compression is not None
    budget = model.compression.budget.model_copy(update={"min_agreement": 0.9})
    compression = model.compression.model_copy(update={"budget": budget})
    config = config.model_copy(update={"models": [model.model_copy(update={"compression": compression})]})
    with running_server(config) as server:
        server.call(server.server.compressed.wait())
        assert server.server.registry.get("digits").default_variant == CHOSEN
        server.server.metrics.registry.register(GpuCollector([0, 1], FakeNvml(), FakeInfo()))
        send_requests(server)
        yield urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()


def send_requests(server: ServerThread) -> None:
    """Requests to the default (compressed) variant and to the original, and one for a missing version."""
    images = normalize(load_splits()["test"].images[:8])
    client = triton.InferenceServerClient(server.address)
    for index in range(len(images)):
        tensor = triton.InferInput("input", [1, 1, 28, 28], "FP32")
        tensor.set_data_from_numpy(images[index : index + 1])
        client.infer("digits", [tensor], model_version="1" if index % 2 else "")
    with pytest.raises(triton.InferenceServerException, match="99"):
        client.infer("digits", [tensor], model_version="99")


def test_every_family_has_samples(scraped: str) -> None:
    families = {family.name: family.samples for family in text_string_to_metric_families(scraped)}
    assert EXPECTED <= set(families), EXPECTED - set(families)
    assert [name for name, samples in families.items() if not samples] == []
    failed = [s for s in families["slimserve_requests"] if s.labels["code"] == "NOT_FOUND"]
    assert failed and failed[0].value == 1


def test_promtool_finds_nothing(promtool: str, scraped: str) -> None:
    result = subprocess.run(
        [promtool, "check", "metrics"], input=scraped, capture_output=True, text=True, timeout=60, check=False
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_no_created_series(scraped: str) -> None:
    assert CREATED.findall(scraped) == []
