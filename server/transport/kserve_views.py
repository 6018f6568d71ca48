"""The KServe v2 views of the registry that both transports answer with: server and model metadata, model
config, statistics, the repository index. Built as the protocol's protobuf messages; the HTTP transport
renders the same messages as JSON (``server/transport/rest_codec.py``), so both say the same thing."""

from __future__ import annotations

from compression.models.names import INPUT_NAME, OUTPUT_NAME
from protos import grpc_service_pb2 as pb
from protos import model_config_pb2 as mc
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


def repository_index(registry: ModelRegistry, server_ready: bool) -> pb.RepositoryIndexResponse:
    state = "READY" if server_ready else "LOADING"
    index = pb.RepositoryIndexResponse.ModelIndex
    return pb.RepositoryIndexResponse(
        models=[
            index(name=model.name, version=variant.version, state=state, reason=variant.name)
            for model in registry.models()
            for variant in model.variants.values()
        ]
    )


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
