"""The KServe v2 views of the registry that both transports answer with: server and model metadata, model
config, statistics, the repository index. Built as the protocol's protobuf messages; the HTTP transport
renders the same messages as JSON (``server/transport/rest_codec.py``), so both say the same thing."""

from __future__ import annotations

from typing import Protocol

from compression.models.names import INPUT_NAME, OUTPUT_NAME
from protos import grpc_service_pb2 as pb
from protos import model_config_pb2 as mc
from protos.errors import FailedPrecondition, InvalidArgument
from server import __version__
from server.observability.stats import Duration, InferenceStats
from server.transport.kserve_codec import INPUT_DATATYPE
from server.variants.registry import ModelRegistry, ServedModel

SERVER_NAME = "slimserve"
EXTENSIONS = ["classification", "model_configuration", "statistics"]
PLATFORM = "pytorch_libtorch"


def server_metadata() -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)


def model_ready(registry: ModelRegistry, server_ready: bool, name: str, version: str) -> bool:
    model = next((m for m in registry.models() if m.name == name), None)
    return server_ready and model is not None and model.has_version(version)


def model_metadata(registry: ModelRegistry, name: str, version: str) -> pb.ModelMetadataResponse:
    """Raises NotFound for an unknown model or version."""
    model = registry.get(name)
    model.resolve(version)
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=model.name,
        versions=[v.version for v in model.variants.values()],
        platform=PLATFORM,
        inputs=[tensor(name=INPUT_NAME, datatype=INPUT_DATATYPE, shape=[-1, *model.input_shape])],
        outputs=[tensor(name=OUTPUT_NAME, datatype="FP32", shape=[-1, model.num_classes])],
    )


def model_config(registry: ModelRegistry, name: str, version: str) -> pb.ModelConfigResponse:
    """Raises NotFound for an unknown model or version."""
    model = registry.get(name)
    variant = model.resolve(version)
    return pb.ModelConfigResponse(config=_model_config(model, variant.properties))


def model_statistics(registry: ModelRegistry, name: str, version: str) -> pb.ModelStatisticsResponse:
    """Every model's statistics when ``name`` is empty; raises NotFound for an unknown model or version."""
    models = [registry.get(name)] if name else registry.models()
    response = pb.ModelStatisticsResponse()
    for model in models:
        variants = [model.resolve(version)] if version else list(model.variants.values())
        for variant in variants:
            response.model_stats.append(_statistics(model.name, variant.version, variant.stats))
    return response


def repository_index(registry: ModelRegistry) -> pb.RepositoryIndexResponse:
    """A row per served variant (its reason names the variant), and one per model that is loading, failed
    or being unloaded; ``state`` is the model's (LOADING, COMPRESSING, READY, UNLOADING, FAILED)."""
    index = pb.RepositoryIndexResponse.ModelIndex
    rows, served = [], set()
    for model in registry.models():
        served.add(model.name)
        status = registry.statuses.get(model.name)
        state = status.state.value if status else "READY"
        why = f": {status.reason}" if status and status.reason else ""
        for variant in model.variants.values():
            rows.append(index(name=model.name, version=variant.version, state=state, reason=variant.name + why))
    for name, status in registry.statuses.items():
        if name not in served:
            rows.append(index(name=name, version="", state=status.state.value, reason=status.reason))
    return pb.RepositoryIndexResponse(models=rows)


class ModelControl(Protocol):
    """Loads and unloads models at run time (``server.repository.ModelRepository``)."""

    async def load_json(self, name: str, config_json: str) -> None: ...

    async def unload(self, name: str) -> None: ...


MODEL_CONTROL_OFF = (
    "model control is off: models come from the deploy config; set server.model_control: explicit to load and "
    "unload models at run time"
)
CONFIG_PARAMETER = "config"
"""``RepositoryModelLoad`` parameter holding the model's JSON entry (what ``tritonclient``'s ``config=`` sends)."""


async def load_model(control: ModelControl | None, name: str, parameters: dict[str, object]) -> None:
    """``RepositoryModelLoad`` for either transport; ``parameters`` maps names to their values."""
    if control is None:
        raise FailedPrecondition(MODEL_CONTROL_OFF)
    unknown = sorted(set(parameters) - {CONFIG_PARAMETER})
    if unknown:
        raise InvalidArgument(
            f"model {name!r}: unsupported load parameter(s) {', '.join(unknown)}; send the model's JSON entry in "
            f"{CONFIG_PARAMETER!r} (file overrides are not supported)"
        )
    config = parameters.get(CONFIG_PARAMETER, "")
    if isinstance(config, bytes):
        config = config.decode("utf-8", errors="replace")
    if not isinstance(config, str):
        raise InvalidArgument(f"model {name!r}: parameter {CONFIG_PARAMETER!r} must be a JSON string")
    await control.load_json(name, config)


async def unload_model(control: ModelControl | None, name: str) -> None:
    if control is None:
        raise FailedPrecondition(MODEL_CONTROL_OFF)
    await control.unload(name)


def _model_config(model: ServedModel, properties: dict[str, str]) -> mc.ModelConfig:
    batching = model.settings.batching
    on_gpu = model.settings.device.startswith("cuda")
    group = mc.ModelInstanceGroup(
        kind=mc.ModelInstanceGroup.KIND_GPU if on_gpu else mc.ModelInstanceGroup.KIND_CPU, count=1
    )
    versions = {f"version_{v.version}": v.name for v in model.variants.values()}
    parameters = {"default_variant": model.default_variant, **versions, **properties}
    return mc.ModelConfig(
        name=model.name,
        platform=PLATFORM,
        backend="pytorch",
        max_batch_size=batching.max_batch_size,
        input=[mc.ModelInput(name=INPUT_NAME, data_type=mc.TYPE_FP32, dims=list(model.input_shape))],
        output=[mc.ModelOutput(name=OUTPUT_NAME, data_type=mc.TYPE_FP32, dims=[model.num_classes])],
        dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=int(batching.max_queue_delay_ms * 1000)),
        instance_group=[group],
        parameters={k: mc.ModelParameter(string_value=v) for k, v in parameters.items()},
    )


def _statistics(model: str, version: str, stats: InferenceStats) -> pb.ModelStatistics:
    def duration(d: Duration) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=d.count, ns=d.ns)

    return pb.ModelStatistics(
        name=model,
        version=version,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=duration(stats.success),
            fail=duration(stats.fail),
            queue=duration(stats.queue),
            compute_input=duration(stats.compute_input),
            compute_infer=duration(stats.compute_infer),
            compute_output=duration(stats.compute_output),
        ),
        batch_stats=[
            pb.InferBatchStatistics(batch_size=size, compute_infer=duration(d))
            for size, d in sorted(stats.batches.items())
        ],
    )
