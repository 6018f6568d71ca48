"""Decorators that turn request errors into gRPC statuses, so servicer methods stay straight-line."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

from server.dataplane import DataPlane, RequestTrack, status_for

Request = TypeVar("Request")
Response = TypeVar("Response")


class HasPlane(Protocol):
    plane: DataPlane


DEADLINE_SLACK_S = 0.1
"""A client's own deadline timer fires a little before the server's (which starts when the request
arrives), and its cancel can arrive first: a cancel this close to the deadline counts as the deadline."""


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
    """Like :func:`aborts_on_error`, and also counts the request and its latency in the metrics."""

    def decorator(
        method: Callable[[Any, Request, RequestTrack], Awaitable[Response]],
    ) -> Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]:
        @functools.wraps(method)
        async def wrapper(self: HasPlane, request: Request, context: grpc.aio.ServicerContext) -> Response:
            track = self.plane.track(name)
            try:
                response = await method(self, request, track)
            except asyncio.CancelledError:
                track.finish(cancelled_code(context))
                raise
            except Exception as exc:  # noqa: BLE001 - every failure must reach the caller as a status
                code, message = status_for(exc)
                track.finish(code)
                await context.abort(code, message)
                raise  # unreachable: abort raises
            track.finish(grpc.StatusCode.OK)
            return response

        return wrapper

    return decorator
