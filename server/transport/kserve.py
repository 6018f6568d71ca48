"""``inference.GRPCInferenceService``: the KServe v2 / Triton protocol, so stock clients work.

Thin: converts protos and delegates to the data plane and registry.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from protos.errors import Unavailable
from server.dataplane import DataPlane, RequestTrack, status_for
from server.transport import kserve_views as views
from server.transport.kserve_codec import build_response, parse_inputs, parse_outputs
from server.transport.rpc import aborts_on_error, start_track, tracked

STATUS_CODE_PARAMETER = "status_code"
"""On a stream error, the echoed response carries the gRPC status code's name (e.g. INVALID_ARGUMENT)."""


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self, plane: DataPlane, is_ready: Callable[[], bool], model_control: views.ModelControl | None = None
    ) -> None:
        self.plane = plane
        self._is_ready = is_ready
        self._model_control = model_control

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
        return pb.ModelReadyResponse(
            ready=views.model_ready(self.plane.registry, self._is_ready(), request.name, request.version)
        )

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return views.server_metadata()

    @aborts_on_error
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return views.model_metadata(self.plane.registry, request.name, request.version)

    @aborts_on_error
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        return views.model_config(self.plane.registry, request.name, request.version)

    @aborts_on_error
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        return views.model_statistics(self.plane.registry, request.name, request.version)

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        return views.repository_index(self.plane.registry)

    @aborts_on_error
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        parameters = {
            key: getattr(value, value.WhichOneof("parameter_choice") or "string_param")
            for key, value in request.parameters.items()
        }
        await views.load_model(self._model_control, request.model_name, parameters)
        return pb.RepositoryModelLoadResponse()

    @aborts_on_error
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        await views.unload_model(self._model_control, request.model_name)
        return pb.RepositoryModelUnloadResponse()

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
            track = start_track(self.plane, "ModelStreamInfer", context)
            try:
                response = await self._infer(request, track)
            except Exception as exc:  # noqa: BLE001 - reported on the stream, the stream goes on
                code, message = status_for(exc)
                track.finish(code, message)
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
        return await infer(self.plane, request, track)

    # --- not supported: no shared memory, trace or log API --------

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


async def infer(plane: DataPlane, request: pb.ModelInferRequest, track: RequestTrack) -> pb.ModelInferResponse:
    """One KServe v2 inference, whichever transport carried it (gRPC here, HTTP in ``rest.py``)."""
    model, variant = plane.resolve(request.model_name, request.model_version, track)
    inputs = parse_inputs(request, model)
    outputs = parse_outputs(request)
    logits = await plane.infer(variant, inputs, track)
    return build_response(request, model, variant.name, logits, outputs)


def _parameter_value(parameter: pb.ModelRepositoryParameter) -> object:
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind else ""


async def _unimplemented(context: grpc.aio.ServicerContext, message: str) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
