"""``inference.GRPCInferenceService``: the KServe v2 / Triton protocol, so stock clients work.

Thin: converts protos and delegates to the data plane and registry.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc

from compression.models.names import INPUT_NAME, OUTPUT_NAME
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from protos import model_config_pb2 as mc
from protos.errors import Unavailable
from server import __version__
from server.dataplane import DataPlane, RequestTrack, status_for
from server.observability.stats import Duration, InferenceStats
from server.transport.kserve_codec import INPUT_DATATYPE, build_response, parse_inputs, parse_outputs
from server.transport.rpc import aborts_on_error, tracked
from server.variants.registry import ServedModel

SERVER_NAME = "slimserve"
EXTENSIONS = ["classification", "model_configuration", "statistics"]
PLATFORM = "pytorch_libtorch"
STATUS_CODE_PARAMETER = "status_code"
"""On a stream error, the echoed response carries the gRPC status code's name (e.g. INVALID_ARGUMENT)."""


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane, is_ready: Callable[[], bool]) -> None:
        self.plane = plane
        self._is_ready = is_ready

    # --- health and metadata ---------------------------------------------------------------------

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        model = next((m for m in self.plane.registry.models() if m.name == request.name), None)
        ready = self._is_ready() and model is not None and model.has_version(request.version)
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    @aborts_on_error
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        model = self.plane.registry.get(request.name)
        model.resolve(request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[v.version for v in model.variants.values()],
            platform=PLATFORM,
            inputs=[tensor(name=INPUT_NAME, datatype=INPUT_DATATYPE, shape=[-1, *model.input_shape])],
            outputs=[tensor(name=OUTPUT_NAME, datatype="FP32", shape=[-1, model.num_classes])],
        )

    @aborts_on_error
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        model = self.plane.registry.get(request.name)
        variant = model.resolve(request.version)
        return pb.ModelConfigResponse(config=_model_config(model, variant.properties))

    @aborts_on_error
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            models = [self.plane.registry.get(request.name)]
        else:
            models = self.plane.registry.models()
        response = pb.ModelStatisticsResponse()
        for model in models:
            variants = [model.resolve(request.version)] if request.version else list(model.variants.values())
            for variant in variants:
                response.model_stats.append(_statistics(model.name, variant.version, variant.stats))
        return response

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        state = "READY" if self._is_ready() else "LOADING"
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                index(name=model.name, version=variant.version, state=state, reason=variant.name)
                for model in self.plane.registry.models()
                for variant in model.variants.values()
            ]
        )

    # --- inference -------------------------------------------------------------------------------

    @tracked("ModelInfer")
    async def ModelInfer(self, request: pb.ModelInferRequest, track: RequestTrack) -> pb.ModelInferResponse:
        return await self._infer(request, track)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests on one stream run concurrently (so they can share batches); each gets one response,
        in completion order, with errors in ``error_message`` rather than ending the stream."""
        responses: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ModelInferRequest) -> None:
            track = self.plane.track("ModelStreamInfer")
            try:
                response = await self._infer(request, track)
            except Exception as exc:  # noqa: BLE001 - reported on the stream, the stream goes on
                code, message = status_for(exc)
                track.finish(code)
                echo = pb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id
                )
                echo.parameters[STATUS_CODE_PARAMETER].string_param = code.name
                await responses.put(pb.ModelStreamInferResponse(error_message=message, infer_response=echo))
                return
            track.finish(grpc.StatusCode.OK)
            await responses.put(pb.ModelStreamInferResponse(infer_response=response))

        async def read_all() -> None:
            try:
                async for request in requests:
                    task = asyncio.create_task(answer(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.gather(*list(tasks))
            finally:
                await responses.put(None)  # also when reading fails (a malformed message): end the call

        reader = asyncio.create_task(read_all())
        try:
            while (item := await responses.get()) is not None:
                yield item
            await reader
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def _infer(self, request: pb.ModelInferRequest, track: RequestTrack) -> pb.ModelInferResponse:
        if not self._is_ready():
            raise Unavailable("the server is not ready")
        model, variant = self.plane.resolve(request.model_name, request.model_version, track)
        inputs = parse_inputs(request, model)
        outputs = parse_outputs(request)
        logits = await self.plane.infer(variant, inputs, track)
        return build_response(request, model, variant.name, logits, outputs)

    # --- not supported: models come from the deploy config; no shared memory, trace or log API --------

    async def RepositoryModelLoad(self, request: object, context: grpc.aio.ServicerContext) -> None:
        await _unimplemented(context, "models are loaded from the deploy config, not through the repository API")

    async def RepositoryModelUnload(self, request: object, context: grpc.aio.ServicerContext) -> None:
        await _unimplemented(context, "models are loaded from the deploy config, not through the repository API")

    async def SystemSharedMemoryStatus(self, request: object, context: grpc.aio.ServicerContext) -> None:
        await _unimplemented(context, "shared memory is not supported; send tensors in raw_input_contents")

    SystemSharedMemoryRegister = SystemSharedMemoryStatus
    SystemSharedMemoryUnregister = SystemSharedMemoryStatus
    CudaSharedMemoryStatus = SystemSharedMemoryStatus
    CudaSharedMemoryRegister = SystemSharedMemoryStatus
    CudaSharedMemoryUnregister = SystemSharedMemoryStatus

    async def TraceSetting(self, request: object, context: grpc.aio.ServicerContext) -> None:
        await _unimplemented(context, "trace settings are not supported")

    async def LogSettings(self, request: object, context: grpc.aio.ServicerContext) -> None:
        await _unimplemented(context, "log settings are not supported; set the log level on the command line")


async def _unimplemented(context: grpc.aio.ServicerContext, message: str) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)


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
