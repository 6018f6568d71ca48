"""One slimserve process: load the configured models, serve them over gRPC and HTTP, export metrics.

``SlimServer.start()`` binds the ports first (health NOT_SERVING, ServerReady false), then loads and
warms up every model off the event loop, and only then reports SERVING.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

from protos import (
    DESCRIPTOR_POOL,
    admin_pb2,
    admin_pb2_grpc,
    classifier_pb2,
    classifier_pb2_grpc,
    grpc_service_pb2,
    grpc_service_pb2_grpc,
)
from server.batching.batcher import Forward
from server.config.settings import DeployConfig, ServerSettings
from server.dataplane import DataPlane
from server.observability.gpu_metrics import register_gpu_metrics
from server.observability.metrics import MetricsEndpoint, ServerMetrics
from server.observability.tracing import Tracing
from server.process.torch_threads import run_in_passing_thread
from server.repository import ModelRepository
from server.transport.admin import AdminServicer
from server.transport.classify import ClassifierServicer
from server.transport.kserve import KServeServicer
from server.transport.rest import RestEndpoint
from server.transport.security import add_port, server_interceptors
from server.variants.compressed import CompressedVariants
from server.variants.registry import ModelRegistry

log = logging.getLogger("slimserve.app")

SERVICE_NAMES = (
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
    classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
)


class StartupError(Exception):
    """The server cannot start (port in use, model fails to load); the message says why."""


class SlimServer:
    def __init__(self, config: DeployConfig) -> None:
        self.config = config
        self.metrics = ServerMetrics()
        register_gpu_metrics(self.metrics.registry, [m.device for m in config.models])
        # NOTE: one inference thread: torch already uses every core inside a forward pass, and a single
        # thread lets the next batch gather while the current one runs.
        self._inference_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._decode_pool = ThreadPoolExecutor(max_workers=config.server.decode_threads, thread_name_prefix="decode")
        self.registry = ModelRegistry(self.metrics, self._inference_pool)
        self.tracing = Tracing(config.server.tracing)
        self.plane = DataPlane(self.registry, self.metrics, self._decode_pool, self.tracing.tracer)
        self.compressed = CompressedVariants(config, self.registry, self.metrics.deploy, self._inference_pool, _warm_up)
        self.repository = ModelRepository(
            config, self.plane, self.compressed, self.metrics, self._inference_pool, _warm_up
        )
        self._model_control = self.repository if config.server.model_control == "explicit" else None
        self._health = health_aio.HealthServicer()
        self._ready = False
        self._grpc: grpc.aio.Server | None = None
        self._rest: RestEndpoint | None = None
        self._metrics_endpoint: MetricsEndpoint | None = None
        self.grpc_port = 0

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def http_port(self) -> int:
        """The bound REST port; 0 when ``server.http_port`` is null."""
        return self._rest.port if self._rest else 0

    @property
    def metrics_port(self) -> int:
        return self._metrics_endpoint.port if self._metrics_endpoint else 0

    async def start(self) -> None:
        await self._listen()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        for settings in self.config.models:
            await self.repository.load(settings)
        self._ready = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("ready: serving %s", ", ".join(m.name for m in self.registry.models()))

    async def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new requests, let in-flight ones finish within ``grace_s``, then release everything."""
        self._ready = False
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.compressed.stop()
        # NOTE: drain while the transport is still up: requests arriving now are answered UNAVAILABLE by
        # the servicers, and in-flight ones finish. Stopping gRPC first would let its core cancel calls it
        # had received but not yet handed to us.
        started = time.monotonic()
        deadline = started + grace_s
        refuse_until = started + min(self.config.server.refuse_before_close_s, grace_s)
        while time.monotonic() < deadline and (self.plane.active_requests or time.monotonic() < refuse_until):
            await asyncio.sleep(0.01)
        if self._grpc is not None:
            await self._grpc.stop(max(0.0, deadline - time.monotonic()))
        if self._rest is not None:
            await self._rest.stop()
        for shadow in self.plane.shadows.values():
            await shadow.stop()
        await self.registry.stop()
        await run_in_passing_thread(self.tracing.shutdown)  # NOTE: exports the spans still buffered
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.close()
        self._inference_pool.shutdown(wait=True)
        self._decode_pool.shutdown(wait=True)
        log.info("stopped")

    async def _listen(self) -> None:
        server_settings = self.config.server
        limit = server_settings.max_message_bytes
        self._grpc = grpc.aio.server(
            interceptors=server_interceptors(server_settings),
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # NOTE: without this a second server could silently share the port with a first one.
                ("grpc.so_reuseport", 0),
            ],
        )
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            KServeServicer(self.plane, lambda: self._ready, self._model_control), self._grpc
        )
        classifier_pb2_grpc.add_ClassifierServicer_to_server(
            ClassifierServicer(self.plane, lambda: self._ready), self._grpc
        )
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self.plane), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        _enable_reflection(self._grpc)
        address = _address(server_settings.host, server_settings.grpc_port)
        try:
            self.grpc_port = add_port(self._grpc, address, server_settings.tls)
        except RuntimeError as exc:
            raise StartupError(f"cannot listen for gRPC on {address}: {exc}") from exc
        if self.grpc_port == 0:
            raise StartupError(f"cannot listen for gRPC on {address} (port in use?)")
        metrics_host = server_settings.metrics_host or server_settings.host
        try:
            self._metrics_endpoint = MetricsEndpoint(self.metrics, metrics_host, server_settings.metrics_port)
        except OSError as exc:
            raise StartupError(
                f"cannot listen for metrics on {_address(metrics_host, server_settings.metrics_port)}: {exc}"
            ) from exc
        await self._grpc.start()
        if server_settings.http_port is not None:
            await self._listen_http(server_settings)
        log.info(
            "gRPC listening on %s, HTTP on %s, metrics on http://%s/metrics",
            _address(server_settings.host, self.grpc_port),
            _address(server_settings.host, self.http_port) if self._rest else "(off)",
            _address(metrics_host, self.metrics_port),
        )

    async def _listen_http(self, server_settings: ServerSettings) -> None:
        assert server_settings.http_port is not None
        self._rest = RestEndpoint(self.plane, lambda: self._ready, server_settings, self._model_control)
        try:
            await self._rest.start(server_settings.host, server_settings.http_port)
        except OSError as exc:
            address = _address(server_settings.host, server_settings.http_port)
            raise StartupError(f"cannot listen for HTTP on {address}: {exc}") from exc

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for service in ("", *SERVICE_NAMES):
            await self._health.set(service, status)


def _warm_up(forward: Forward, input_shape: tuple[int, int, int], max_batch: int) -> dict[int, float]:
    """Run batches of 1 and ``max_batch`` twice each; returns the faster run's seconds per batch size. They seed
    the serving policy's latency tables, optimistically: a variant thought faster than it is gets a batch and is
    corrected by it, while one thought slower might never get one."""
    timings: dict[int, float] = {}
    with torch.inference_mode():
        for batch in sorted({1, max_batch}):
            inputs = torch.from_numpy(np.zeros((batch, *input_shape), dtype=np.float32))
            for _ in range(2):
                started = time.perf_counter()
                forward(inputs)
                seconds = time.perf_counter() - started
                timings[batch] = min(seconds, timings.get(batch, seconds))
    return timings


def _enable_reflection(server: grpc.aio.Server) -> None:
    """Server reflection (``grpcurl list``) over slimserve's descriptor pool, plus health and reflection."""
    for file in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        try:
            DESCRIPTOR_POOL.FindFileByName(file.name)
        except KeyError:
            DESCRIPTOR_POOL.AddSerializedFile(file.serialized_pb)
    names = (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server, pool=DESCRIPTOR_POOL)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


@asynccontextmanager
async def run_server(config: DeployConfig, grace_s: float = 5.0) -> AsyncIterator[SlimServer]:
    """Start a server for the duration of a ``with`` block (tests bind port 0 and read ``grpc_port``)."""
    server = SlimServer(config)
    try:
        await server.start()
        yield server
    finally:
        await server.stop(grace_s)


async def serve(config: DeployConfig, grace_s: float = 10.0) -> None:
    """Run until SIGTERM or SIGINT, then drain gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = SlimServer(config)
    try:
        await server.start()
        log.info("pid %d; send SIGTERM to stop", os.getpid())
        await stop.wait()
        log.info("stopping: draining in-flight requests (up to %.0f s)", grace_s)
    finally:
        await server.stop(grace_s)
