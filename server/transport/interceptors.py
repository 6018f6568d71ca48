"""Server interceptors' shared plumbing, and the one that turns undecodable messages into INVALID_ARGUMENT.

grpcio answers a unary call whose message does not parse (corrupt protobuf, invalid UTF-8 in a string
field) with UNKNOWN, and leaves a streaming call waiting for its deadline. Here the handler receives
raw bytes and parses them itself, so the caller hears INVALID_ARGUMENT with the parser's reason.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def behaviour_of(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


def rebuild(
    handler: grpc.RpcMethodHandler, behaviour: Callable[..., Any], *, request_deserializer: Any
) -> grpc.RpcMethodHandler:
    """A handler of the same kind (unary/streaming each way) as ``handler``, running ``behaviour``."""
    factory = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(
        behaviour, request_deserializer=request_deserializer, response_serializer=handler.response_serializer
    )


def refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers every call with ``code`` and ``message``."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    async def refuse_streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield  # unreachable (abort raises); makes this an async generator, as streaming handlers are

    return rebuild(handler, refuse_streaming if handler.response_streaming else refuse, request_deserializer=None)


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Parses request messages inside the handler, so a message that does not parse gets INVALID_ARGUMENT."""

    def __init__(self) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        wrapped = self._handlers.get(method)
        if wrapped is None:  # one wrapper per registered method, built on its first call
            wrapped = _decoding(await continuation(handler_call_details), method)
            if wrapped is not None:  # unknown methods are not remembered: callers choose their names
                self._handlers[method] = wrapped
        return wrapped


def _decoding(handler: grpc.RpcMethodHandler | None, method: str) -> grpc.RpcMethodHandler | None:
    if handler is None or handler.request_deserializer is None:
        return handler
    inner = behaviour_of(handler)
    if not (inspect.iscoroutinefunction(inner) or inspect.isasyncgenfunction(inner)):
        return handler  # a synchronous handler; slimserve registers none
    parse_message = handler.request_deserializer

    async def parse(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return parse_message(raw)
        except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError, and others on odd input
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {method} request message: {exc}")

    async def parsed_stream(raw_messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
        async for raw in raw_messages:
            yield await parse(raw, context)

    async def argument(raw: Any, context: grpc.aio.ServicerContext) -> Any:
        return parsed_stream(raw, context) if handler.request_streaming else await parse(raw, context)

    if inspect.isasyncgenfunction(inner):

        async def behaviour(raw: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in inner(await argument(raw, context), context):
                yield response

    else:

        async def behaviour(raw: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[misc]
            return await inner(await argument(raw, context), context)

    return rebuild(handler, behaviour, request_deserializer=None)
