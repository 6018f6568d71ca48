"""A real Prometheus (Debian's package) scrapes a real slimserve under load, with the shipped config and rules.

The test queries Prometheus' HTTP API: series for both variants, the recording rules' values, the live
shadow agreement, and every PromQL expression of the shipped Grafana dashboard must return data.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import tritonclient.grpc as triton
import yaml
from matplotlib.image import imread

from benchmarks.common import free_port
from compression.models.digits.data import load_splits, normalize
from server.config.settings import ServingSettings, ShadowSettings
from tests.compressed_digits import CHOSEN, digits_config, seed_trained_digits
from tests.serving import ServerThread, eventually, running_server

pytestmark = pytest.mark.slow

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
LOAD_SECONDS = 12
RETRY = (OSError, KeyError, IndexError, RuntimeError)
"""Prometheus still starting, or no target or sample yet."""
METRIC_NAME = re.compile(r"\b(?:model_variant:|model:)?slimserve_[a-z0-9_:]+")


def load_renderer() -> ModuleType:
    path = DEPLOY / "grafana" / "render_snapshot.py"
    spec = importlib.util.spec_from_file_location("render_snapshot", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_snapshot = load_renderer()


@pytest.fixture(scope="module")
def promtool() -> str:
    subprocess.run(["bash", str(PROMETHEUS_DIR / "ensure-prometheus.sh")], check=True, timeout=600)
    return "promtool"


def test_shipped_config_and_rules_are_valid(promtool: str) -> None:
    for args in (["check", "config", "prometheus.yml"], ["test", "rules", "rules_test.yml"]):
        result = subprocess.run([promtool, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr


def scrape_config_for(metrics_port: int, workdir: Path) -> Path:
    """The shipped prometheus.yml, pointed at this test's server and rule files, scraping every second."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def compressed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """Digits with a real compressed variant (found by a one-candidate search) and every request shadowed."""
    cache = tmp_path_factory.mktemp("cache")
    seed_trained_digits(cache)
    serving = ServingSettings(slo_p95_ms=50)  # the objective's panel and alert need one; policy stays compressed
    with running_server(digits_config(cache, shadow=ShadowSettings(fraction=1.0), serving=serving)) as server:
        server.call(server.server.compressed.wait())
        assert server.server.registry.get("digits").default_variant == CHOSEN
        yield server


@pytest.fixture(scope="module")
def prometheus(
    promtool: str, compressed_server: ServerThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    workdir = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    process = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={scrape_config_for(compressed_server.server.metrics_port, workdir)}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "prometheus.log").open("w"),
    )
    client = render_snapshot.Prometheus(f"http://127.0.0.1:{port}")
    try:
        eventually(lambda: client.get("/api/v1/targets")["activeTargets"][0]["health"] == "up", 30, retry_on=RETRY)
        yield client
    finally:
        process.terminate()
        process.wait(timeout=30)


def drive_load(server: ServerThread, seconds: float) -> int:
    """Closed-loop load on the default variant, a share pinned to the original, and a few bad requests."""
    split = load_splits()["test"]
    images = normalize(split.images[:64])
    client = triton.InferenceServerClient(server.address)

    def worker(index: int) -> int:
        sent = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            tensor = triton.InferInput("input", [1, 1, 28, 28], "FP32")
            tensor.set_data_from_numpy(images[sent % 64 : sent % 64 + 1])
            version = "1" if index == 0 else ""
            client.infer("digits", [tensor], model_version=version)
            sent += 1
            if sent % 50 == 0:
                with pytest.raises(triton.InferenceServerException):
                    client.infer("digits", [tensor], model_version="99")
            time.sleep(0.002)
        return sent

    with ThreadPoolExecutor(max_workers=4) as pool:
        return sum(pool.map(worker, range(4)))


@pytest.fixture(scope="module")
def loaded(compressed_server: ServerThread, prometheus: Any) -> Any:
    """Prometheus after scraping the server under load long enough for every rate and rule."""
    assert drive_load(compressed_server, LOAD_SECONDS) > 100
    eventually(lambda: bool(prometheus.instant("model:slimserve_shadow_agreement:ratio_rate5m")), 30, retry_on=RETRY)
    return prometheus


def by_variant(result: list[dict[str, Any]]) -> dict[str, float]:
    return {series["metric"].get("variant", ""): float(series["value"][1]) for series in result}


def test_both_variants_have_live_and_deploy_series(loaded: Any) -> None:
    requests = by_variant(loaded.instant('sum by (variant) (slimserve_requests_total{code="OK"})'))
    assert set(requests) == {"original", CHOSEN} and min(requests.values()) > 0
    failures = by_variant(loaded.instant('sum by (variant) (slimserve_requests_total{code="NOT_FOUND"})'))
    assert failures  # the bad requests are counted, under the status the caller saw
    latency = by_variant(loaded.instant("model_variant:slimserve_request_duration_seconds:p95_rate1m"))
    assert set(latency) == {"original", CHOSEN} and all(0 < v < 1 for v in latency.values())
    throughput = by_variant(loaded.instant("model_variant:slimserve_inferences:rate1m"))
    assert set(throughput) == {"original", CHOSEN} and all(v > 0 for v in throughput.values())
    p95 = by_variant(loaded.instant("slimserve_deploy_latency_p95_seconds"))
    assert set(p95) == {"original", CHOSEN}


def test_recording_rules_compare_the_variants(loaded: Any) -> None:
    p95 = by_variant(loaded.instant("slimserve_deploy_latency_p95_seconds"))
    size = by_variant(loaded.instant("slimserve_deploy_size_bytes"))
    (speedup,) = loaded.instant("model:slimserve_deploy_speedup:ratio")
    assert float(speedup["value"][1]) == pytest.approx(p95["original"] / p95[CHOSEN], rel=1e-6)
    (size_ratio,) = loaded.instant("model:slimserve_deploy_size:ratio")
    assert float(size_ratio["value"][1]) == pytest.approx(size["original"] / size[CHOSEN], rel=1e-6)
    assert float(size_ratio["value"][1]) > 2  # int8 weights are about 4x smaller


def test_shadow_agreement_is_measured_live(loaded: Any) -> None:
    (agreement,) = loaded.instant("model:slimserve_shadow_agreement:ratio_rate5m")
    assert 0.9 < float(agreement["value"][1]) <= 1.0  # int8 digits agrees with fp32 on nearly every image
    compared = loaded.instant("sum(slimserve_shadow_comparisons_total)")
    assert float(compared[0]["value"][1]) > 50
    (window,) = loaded.instant("slimserve_guardrail_window_agreement_ratio")
    assert float(window["value"][1]) > 0.9
    (rollbacks,) = loaded.instant("sum(slimserve_guardrail_rollbacks_total)")
    assert float(rollbacks["value"][1]) == 0


def test_every_dashboard_query_returns_data(loaded: Any) -> None:
    dashboard = json.loads(render_snapshot.DASHBOARD.read_text())
    panel_queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    empty = []
    for expr in render_snapshot.dashboard_queries(dashboard):
        query = render_snapshot.expand(expr)
        assert "$" not in query, f"unexpanded variable in {expr}"
        missing = [name for name in METRIC_NAME.findall(query) if not loaded.instant(f"count({name})")]
        # annotations mark rare events (a rollback): their metrics must exist, the event need not have happened
        if missing or (expr in panel_queries and not loaded.instant(query)):
            empty.append(f"{expr} (missing: {missing})")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
    templating = [v for v in dashboard["templating"]["list"] if v["type"] == "query"]
    for variable in templating:
        metric = variable["definition"].removeprefix("label_values(").split(",")[0]
        assert loaded.get(f"/api/v1/label/{variable['name']}/values", **{"match[]": metric}) == ["digits"]


def test_snapshot_renders_from_prometheus(loaded: Any, tmp_path: Path) -> None:
    out = render_snapshot.render(loaded, tmp_path / "dashboard.png", minutes=2)
    image = imread(out)
    assert image.shape[0] > 500 and image.std() > 0.05  # a real picture, not a blank page
