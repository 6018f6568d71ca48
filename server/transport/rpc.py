"""Decorators that turn request errors into gRPC statuses, so servicer methods stay straight-line; they also
count and trace every gRPC request (``start_track``)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

from protos import classifier_pb2, grpc_service_pb2
from server.dataplane import DataPlane, RequestTrack, status_for
from server.observability import tracing

Request = TypeVar("Request")
Response = TypeVar("Response")


class HasPlane(Protocol):
    plane: DataPlane


DEADLINE_SLACK_S = 0.1
"""A client's own deadline timer fires a little before the server's (which starts when the request
arrives), and its cancel can arrive first: a cancel this close to the deadline counts as the deadline."""


SERVICES = {
    method: service.full_name
    for file in (grpc_service_pb2.DESCRIPTOR, classifier_pb2.DESCRIPTOR)
    for service in file.services_by_name.values()
    for method in service.methods_by_name
}
"""Method name -> the full name of its gRPC service (``ModelInfer`` -> ``inference.GRPCInferenceService``)."""


def start_track(plane: DataPlane, method: str, context: grpc.aio.ServicerContext) -> RequestTrack:
    """``plane.track(method)``; while tracing is on, also the request's server span, a child of the caller's
    ``traceparent`` metadata, with the RPC semantic conventions' attributes."""
    track = plane.track(method)
    if plane.tracer is not None:
        service = SERVICES[method]
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method, tracing.METHOD: method}
        carrier = tracing.grpc_carrier(context.invocation_metadata())
        track.start_span(plane.tracer, f"{service}/{method}", carrier, attributes)
    return track


def cancelled_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """Why gRPC cancelled a call: its deadline passed (DEADLINE_EXCEEDED) or the caller went away."""
    remaining = context.time_remaining()
    expired = remaining is not None and remaining <= DEADLINE_SLACK_S
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


def aborts_on_error(
    method: Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]],
) -> Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]:
    """Errors become ``context.abort`` with their status (unexpected ones INTERNAL, logged)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Request, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every failure must reach the caller as a status
            code, message = status_for(exc)
            await context.abort(code, message)
            raise  # unreachable: abort raises

    return wrapper


def tracked(
    name: str,
) -> Callable[
    [Callable[[Any, Request, RequestTrack], Awaitable[Response]]],
    Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]],
]:
    """Like :func:`aborts_on_error`, and also counts the request and its latency in the metrics (and traces it)."""

    def decorator(
        method: Callable[[Any, Request, RequestTrack], Awaitable[Response]],
    ) -> Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]:
        @functools.wraps(method)
        async def wrapper(self: HasPlane, request: Request, context: grpc.aio.ServicerContext) -> Response:
            track = start_track(self.plane, name, context)
            try:
                response = await method(self, request, track)
            except asyncio.CancelledError:
                track.finish(cancelled_code(context))
                raise
            except Exception as exc:  # noqa: BLE001 - every failure must reach the caller as a status
                code, message = status_for(exc)
                track.finish(code, message)
                await context.abort(code, message)
                raise  # unreachable: abort raises
            track.finish(grpc.StatusCode.OK)
            return response

        return wrapper

    return decorator
