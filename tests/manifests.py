"""Offline validation of the Kubernetes and KServe manifests in deploy/.

Built-in kinds are checked by ``kubernetes-validate`` against the Kubernetes JSON schemas it bundles,
in strict mode (unknown fields are errors). Custom resources have no schema offline, so they are
checked against the structural schemas below: the fields of their APIs, strict at every level, with
every embedded Kubernetes type (containers, probes, volumes, selectors, metadata) checked against the
same bundled Kubernetes schema. Field lists: KServe's from its Python SDK models (kserve 0.21:
``V1alpha1ServingRuntimeSpec``, ``V1beta1PredictorSpec``, ``V1beta1ModelSpec``), the Prometheus
operator's from its ``monitoring.coreos.com/v1`` API reference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import schema_contents

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY = REPO_ROOT / "deploy"
MANIFEST_DIRS = (DEPLOY / "k8s", DEPLOY / "kserve")
NOT_MANIFESTS = {"kustomization.yaml", "prometheus-adapter-values.yaml"}
"""YAML files in MANIFEST_DIRS that are not applied as resources (checked on their own)."""
OLDEST_K8S, NEWEST_K8S = "1.30", kubernetes_validate.utils.latest_version()
"""Oldest: native preStop ``sleep`` is on by default from 1.30 (gRPC probes from 1.27)."""

Schema = dict[str, Any]

STRING: Schema = {"type": "string"}
BOOL: Schema = {"type": "boolean"}
INT: Schema = {"type": "integer"}
OBJECT: Schema = {"type": "object"}
STRING_MAP: Schema = {"type": "object", "additionalProperties": STRING}
DURATION: Schema = {"type": "string", "pattern": "^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"}


def manifest_files() -> list[Path]:
    return sorted(p for d in MANIFEST_DIRS for p in d.glob("*.yaml") if p.name not in NOT_MANIFESTS)


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def resources() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in manifest_files():
        for doc in documents(path):
            yield path, doc


def core(name: str) -> Schema:
    """A Kubernetes type from the bundled definitions, e.g. ``api.core.v1.Container``."""
    return {"$ref": f"#/$defs/io.k8s.{name}"}


def strict(properties: dict[str, Schema], required: tuple[str, ...] = ()) -> Schema:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


def array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


@cache
def core_definitions(version: str) -> dict[str, Schema]:
    """The strict Kubernetes definitions bundled with kubernetes-validate for ``version``."""
    full = next(v for v in reversed(kubernetes_validate.utils.all_versions()) if v.startswith(version))
    return schema_contents(f"kubernetes-json-schema/v{full}-local-strict/_definitions.json", version)["$defs"]


def extended(definitions: dict[str, Schema], base: str, extra: dict[str, Schema]) -> Schema:
    """A Kubernetes type with more fields and none required (KServe's ModelSpec is a Container plus a model)."""
    return strict({**definitions[f"io.k8s.{base}"]["properties"], **extra})


def serving_runtime_spec(_: dict[str, Schema]) -> Schema:
    model_format = strict(
        {"name": STRING, "version": STRING, "autoSelect": BOOL, "priority": {"type": "integer", "minimum": 1}},
        required=("name",),
    )
    return strict(
        {
            "affinity": core("api.core.v1.Affinity"),
            "annotations": STRING_MAP,
            "builtInAdapter": OBJECT,
            "containers": {**array(core("api.core.v1.Container")), "minItems": 1},
            "disabled": BOOL,
            "grpcDataEndpoint": STRING,
            "grpcEndpoint": STRING,
            "hostIPC": BOOL,
            "httpDataEndpoint": STRING,
            "imagePullSecrets": array(core("api.core.v1.LocalObjectReference")),
            "labels": STRING_MAP,
            "multiModel": BOOL,
            "nodeSelector": STRING_MAP,
            "protocolVersions": array({"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]}),
            "replicas": INT,
            "resourceClaims": array(core("api.core.v1.PodResourceClaim")),
            "schedulerName": STRING,
            "storageHelper": strict({"disabled": BOOL}),
            "supportedModelFormats": array(model_format),
            "tolerations": array(core("api.core.v1.Toleration")),
            "volumes": array(core("api.core.v1.Volume")),
            "workerSpec": OBJECT,
        },
        required=("containers",),
    )


def inference_service_spec(definitions: dict[str, Schema]) -> Schema:
    model = extended(
        definitions,
        "api.core.v1.Container",
        {
            "modelFormat": strict({"name": STRING, "version": STRING}, required=("name",)),
            "protocolVersion": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]},
            "runtime": STRING,
            "runtimeVersion": STRING,
            "storageUri": STRING,
            "storage": OBJECT,
            "confidential": OBJECT,
        },
    )
    component = {
        "annotations": STRING_MAP,
        "labels": STRING_MAP,
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
        "scaleTarget": INT,
        "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
        "scaleMetricType": {"enum": ["Utilization", "AverageValue", "Value"]},
        "containerConcurrency": INT,
        "timeout": INT,
        "canaryTrafficPercent": INT,
        "autoScaling": OBJECT,
        "batcher": OBJECT,
        "logger": OBJECT,
        "deploymentStrategy": core("api.apps.v1.DeploymentStrategy"),
        "storageUris": array(OBJECT),
        "workerSpec": OBJECT,
    }
    frameworks = ("huggingface", "lightgbm", "onnx", "paddle", "pmml", "pytorch", "sklearn", "tensorflow")
    predictor = extended(
        definitions,
        "api.core.v1.PodSpec",
        {**component, "model": model, **{name: OBJECT for name in (*frameworks, "triton", "xgboost")}},
    )
    return strict({"predictor": predictor, "transformer": OBJECT, "explainer": OBJECT}, required=("predictor",))


def pod_monitor_spec(_: dict[str, Schema]) -> Schema:
    endpoint = strict(
        {
            "port": STRING,
            "portNumber": INT,
            "path": STRING,
            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
            "params": OBJECT,
            "interval": DURATION,
            "scrapeTimeout": DURATION,
            "honorLabels": BOOL,
            "honorTimestamps": BOOL,
            "trackTimestampsStaleness": BOOL,
            "metricRelabelings": array(OBJECT),
            "relabelings": array(OBJECT),
            "filterRunning": BOOL,
            "followRedirects": BOOL,
            "enableHttp2": BOOL,
            "proxyUrl": STRING,
            "authorization": OBJECT,
            "basicAuth": OBJECT,
            "oauth2": OBJECT,
            "tlsConfig": OBJECT,
        }
    )
    return strict(
        {
            "selector": core("apimachinery.pkg.apis.meta.v1.LabelSelector"),
            "namespaceSelector": strict({"any": BOOL, "matchNames": array(STRING)}),
            "podMetricsEndpoints": array(endpoint),
            "jobLabel": STRING,
            "podTargetLabels": array(STRING),
            "sampleLimit": INT,
            "targetLimit": INT,
            "labelLimit": INT,
            "labelNameLengthLimit": INT,
            "labelValueLengthLimit": INT,
            "keepDroppedTargets": INT,
            "attachMetadata": strict({"node": BOOL}),
            "scrapeClass": STRING,
            "scrapeProtocols": array(STRING),
            "bodySizeLimit": STRING,
        },
        required=("selector",),
    )


CUSTOM_RESOURCES: dict[tuple[str, str], Callable[[dict[str, Schema]], Schema]] = {
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): serving_runtime_spec,
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): serving_runtime_spec,
    ("serving.kserve.io/v1beta1", "InferenceService"): inference_service_spec,
    ("monitoring.coreos.com/v1", "PodMonitor"): pod_monitor_spec,
}


def custom_resource_schema(api_version: str, kind: str, version: str) -> Schema:
    definitions = core_definitions(version)
    spec = CUSTOM_RESOURCES[(api_version, kind)](definitions)
    return {
        "$defs": definitions,
        **strict(
            {
                "apiVersion": {"const": api_version},
                "kind": {"const": kind},
                "metadata": core("apimachinery.pkg.apis.meta.v1.ObjectMeta"),
                "spec": spec,
            },
            required=("apiVersion", "kind", "metadata", "spec"),
        ),
    }


def validate(doc: dict[str, Any], version: str) -> None:
    """Raise ``jsonschema.ValidationError`` (kubernetes-validate's is a subclass) when ``doc`` is invalid."""
    key = (doc.get("apiVersion", ""), doc.get("kind", ""))
    if key in CUSTOM_RESOURCES:
        schema = custom_resource_schema(*key, version)
        jsonschema.Draft202012Validator(schema).validate(doc)
    else:
        kubernetes_validate.validate(doc, version, strict=True)


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The containers of a workload or runtime (Deployment, Job, ServingRuntime)."""
    spec = doc["spec"]
    pod = spec["template"]["spec"] if "template" in spec else spec
    return pod["containers"]


def by_kind(kind: str) -> dict[str, Any]:
    """The one resource of ``kind`` in deploy/."""
    found = [doc for _, doc in resources() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]
