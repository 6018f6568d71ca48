"""The Kubernetes and KServe manifests, offline: schemas, yamllint, and agreement with the code.

Schemas: tests/manifests.py (kubernetes-validate's bundled Kubernetes schemas, strict; structural
schemas for the custom resources). Agreement: the container arguments are ``slimserve`` commands, the
ConfigMap holds a valid deploy config, ports, names, mounts and the drain time match each other and
the server.
"""

from __future__ import annotations

import copy
import inspect
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from server.app import serve
from server.cli import build_parser
from server.config.settings import DeployConfig, ServerSettings, load_config
from server.healthcheck import DEFAULT_PORT
from server.observability.metrics import ServerMetrics
from tests.dockerfile import Dockerfile, dockerignore_patterns, excluded_from_context
from tests.manifests import (
    DEPLOY,
    NEWEST_K8S,
    NOT_MANIFESTS,
    OLDEST_K8S,
    REPO_ROOT,
    by_kind,
    containers,
    documents,
    manifest_files,
    resources,
    validate,
)

RESOURCES = list(resources())
WORKLOADS = ("Deployment", "Job")


def resource_id(item: tuple[Path, dict[str, Any]]) -> str:
    path, doc = item
    return f"{path.parent.name}/{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.parametrize("version", [OLDEST_K8S, NEWEST_K8S])
@pytest.mark.parametrize("item", RESOURCES, ids=resource_id)
def test_manifest_matches_its_schema(item: tuple[Path, dict[str, Any]], version: str) -> None:
    validate(item[1], version)


@pytest.mark.parametrize("item", RESOURCES, ids=resource_id)
def test_a_misspelt_field_is_caught(item: tuple[Path, dict[str, Any]]) -> None:
    doc = copy.deepcopy(item[1])
    doc["metdata"] = doc.pop("metadata")
    with pytest.raises(jsonschema.ValidationError):
        validate(doc, NEWEST_K8S)


@pytest.mark.parametrize("kind", [*WORKLOADS, "ClusterServingRuntime", "InferenceService"])
def test_a_misspelt_nested_field_is_caught(kind: str) -> None:
    doc = copy.deepcopy(by_kind(kind))
    container = doc["spec"]["predictor"]["model"] if kind == "InferenceService" else containers(doc)[0]
    container.setdefault("resources", {})["limts"] = {"cpu": "1"}
    with pytest.raises(jsonschema.ValidationError, match="limts"):
        validate(doc, NEWEST_K8S)


def test_every_manifest_is_a_known_resource() -> None:
    kinds = sorted(doc["kind"] for _, doc in RESOURCES)
    assert kinds == sorted(
        [
            "Namespace",
            "ConfigMap",
            "PersistentVolumeClaim",
            "Job",
            "Deployment",
            "Service",
            "HorizontalPodAutoscaler",
            "PodMonitor",
            "ClusterServingRuntime",
            "InferenceService",
        ]
    )


def test_yaml_under_deploy_passes_yamllint() -> None:
    config = YamlLintConfig(file=str(REPO_ROOT / ".yamllint"))
    paths = sorted(p for pattern in ("*.yaml", "*.yml") for p in DEPLOY.rglob(pattern))
    errors = [
        f"{path.relative_to(REPO_ROOT)}:{problem.line}:{problem.column} {problem.desc} ({problem.rule})"
        for path in paths
        for problem in linter.run(path.read_text(), config, str(path))
        if problem.level == "error"
    ]
    assert paths and not errors, "\n".join(errors)


def test_yamllint_catches_a_syntax_error() -> None:
    config = YamlLintConfig(file=str(REPO_ROOT / ".yamllint"))
    problems = list(linter.run("a: 1\n  b: 2\n", config))
    assert any(p.level == "error" for p in problems)


def configmap_config(tmp_path: Path) -> DeployConfig:
    path = tmp_path / "config.yaml"
    path.write_text(by_kind("ConfigMap")["data"]["config.yaml"])
    return load_config(path)


def test_configmap_holds_a_valid_deploy_config(tmp_path: Path) -> None:
    config = configmap_config(tmp_path)
    assert config.models and all(m.compression is not None and m.compression.enabled for m in config.models)


def mounts(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> the pod volume mounted there, for the first container."""
    spec = doc["spec"]
    pod = spec["template"]["spec"] if "template" in spec else spec
    volumes = {v["name"]: v for v in pod["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in containers(doc)[0]["volumeMounts"]}


def slimserve_args(doc: dict[str, Any]) -> Any:
    """The container's arguments parsed by slimserve's own command line (exits on a bad argument)."""
    return build_parser().parse_args(containers(doc)[0]["args"])


@pytest.mark.parametrize(("kind", "command"), [("Deployment", "serve"), ("Job", "compress")])
def test_workloads_run_slimserve_on_the_configmap_and_the_shared_store(kind: str, command: str, tmp_path: Path) -> None:
    doc = by_kind(kind)
    args = slimserve_args(doc)
    assert args.command == command
    volumes = mounts(doc)
    assert volumes[str(args.config.parent)]["configMap"]["name"] == by_kind("ConfigMap")["metadata"]["name"]
    assert args.config.name in by_kind("ConfigMap")["data"]
    store = volumes[str(configmap_config(tmp_path).cache_dir)]
    assert store["persistentVolumeClaim"]["claimName"] == by_kind("PersistentVolumeClaim")["metadata"]["name"]


def test_the_store_is_shared_and_job_and_replicas_run_one_image() -> None:
    assert "ReadWriteMany" in by_kind("PersistentVolumeClaim")["spec"]["accessModes"]
    images = {containers(by_kind(kind))[0]["image"] for kind in WORKLOADS}
    assert len(images) == 1
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert {i["name"] for i in kustomization["images"]} == {images.pop().split(":")[0]}


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in manifest_files() if p.parent.name == "k8s"}
    assert NOT_MANIFESTS <= {p.name for p in (DEPLOY / "k8s").glob("*.yaml")}


def test_ports_agree_everywhere(tmp_path: Path) -> None:
    server = configmap_config(tmp_path).server
    container = containers(by_kind("Deployment"))[0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": server.http_port, "grpc": server.grpc_port, "metrics": server.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == server.grpc_port
    service = by_kind("Service")["spec"]
    assert service["clusterIP"] == "None"  # headless: clients balance per request
    assert {p["targetPort"] for p in service["ports"]} == set(ports)
    assert {e["port"] for e in by_kind("PodMonitor")["spec"]["podMetricsEndpoints"]} == {"metrics"}
    assert sorted(Dockerfile().exposed_ports()) == sorted(ports.values())
    defaults = ServerSettings()
    assert (defaults.http_port, defaults.grpc_port, defaults.metrics_port) == (
        server.http_port,
        server.grpc_port,
        server.metrics_port,
    )
    assert DEFAULT_PORT == defaults.grpc_port


def test_termination_grace_outlasts_the_drain(tmp_path: Path) -> None:
    """preStop sleep, then slimserve's drain (refusing for refuse_before_close_s happens inside it)."""
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    drain_s = inspect.signature(serve).parameters["grace_s"].default
    refuse_s = configmap_config(tmp_path).server.refuse_before_close_s
    assert refuse_s < drain_s
    pre_stop_s = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop_s + drain_s + 5


def adapter_metrics() -> dict[str, str]:
    """Custom metric name -> the Prometheus series it is computed from, per prometheus-adapter rule."""
    values = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter-values.yaml").read_text())
    exposed = {}
    for rule in values["rules"]["custom"]:
        series = re.match(r"\w+", rule["seriesQuery"].strip("'")).group(0)  # type: ignore[union-attr]
        pattern = rule["name"]["matches"]
        as_ = rule["name"]["as"].replace("${1}", r"\1")
        exposed[re.sub(pattern, as_, series)] = series
    return exposed


def slimserve_series() -> set[str]:
    """Every series name a slimserve /metrics endpoint can export."""
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "gauge": ("",)}
    names = set()
    for family in ServerMetrics().registry.collect():
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
    return names


def test_hpa_scales_the_deployment_on_slimserve_metrics() -> None:
    hpa = by_kind("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == by_kind("Deployment")["metadata"]["name"]
    assert hpa["minReplicas"] >= 2
    exposed = adapter_metrics()
    wanted = {m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"}
    assert wanted and wanted <= set(exposed), f"no prometheus-adapter rule for {wanted - set(exposed)}"
    assert {exposed[name] for name in wanted} <= slimserve_series()


def test_kserve_runtime_serves_the_inference_service() -> None:
    runtime, isvc = by_kind("ClusterServingRuntime"), by_kind("InferenceService")
    assert "namespace" not in runtime["metadata"]  # cluster-scoped
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    container = runtime["spec"]["containers"][0]
    assert container["name"] == "kserve-container"
    args = slimserve_args(runtime)
    assert args.command == "serve" and args.config.parent == Path("/mnt/models")  # KServe mounts storageUri here
    assert [p["containerPort"] for p in container["ports"]] == [args.grpc_port]
    assert container["readinessProbe"]["grpc"]["port"] == args.grpc_port
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == str(args.metrics_port)


def test_dockerfile_runs_what_the_manifests_run(tmp_path: Path) -> None:
    docker = Dockerfile()
    assert docker.entrypoint() == ["slimserve"]
    assert containers(by_kind("Deployment"))[0]["args"] == docker.cmd()
    config = build_parser().parse_args(docker.cmd()).config
    health = docker.healthcheck()
    assert health[:3] == ["python", "-m", "server.healthcheck"] and health[health.index("--config") + 1] == str(config)
    image_env = docker.env({"PATH": ""})
    assert image_env["SLIMSERVE_CACHE_DIR"] == str(configmap_config(tmp_path).cache_dir)


def test_dockerfile_copies_only_what_the_build_context_holds() -> None:
    patterns = dockerignore_patterns()
    sources = [source for sources, _ in Dockerfile().copies() for source in sources]
    assert sources and all((REPO_ROOT / s).exists() and not excluded_from_context(s, patterns) for s in sources)
    assert excluded_from_context(".venv/bin/python", patterns) and excluded_from_context("server/__pycache__", patterns)


def test_dockerfile_pins_torch_as_pyproject_does() -> None:
    pins = {word for command in Dockerfile().run_commands() for word in shlex.split(command) if "==" in word}
    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {p.split("==")[0] for p in pins} == {"torch", "torchvision"} and pins <= set(dependencies)


def test_documents_parse_one_resource_per_file() -> None:
    for path in manifest_files():
        assert len(documents(path)) == 1, path
