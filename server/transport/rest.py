"""KServe v2 over HTTP/REST (Triton's port 8000), beside gRPC in the same process and event loop.

Thin like the gRPC servicers: routes parse HTTP into the protocol's messages (``rest_codec``) and call
the same functions (``kserve.infer``, ``classify.classify``, ``kserve_views``), so batching, limits,
metrics and error messages are those of gRPC. Errors are ``{"error": message}`` with the HTTP status
Triton uses for the gRPC code. Health endpoints are open; everything else follows ``server.auth``.

aiohttp serves it: asyncio-native (one event loop with grpc.aio, no second server thread), TLS through
``ssl``, a body-size limit, multipart parsing, and the lowest cost per 600 KB request among the
frameworks measured (docs/benchmarks.md, "HTTP framework").
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import BodyPartReader, web
from aiohttp.web_protocol import RequestPayloadError
from opentelemetry.trace import Tracer

from protos.errors import InvalidArgument, ServingError, Unavailable
from server.config.settings import ServerSettings
from server.dataplane import DataPlane, RequestTrack, status_for
from server.observability import tracing
from server.transport import kserve_views as views
from server.transport.classify import classify
from server.transport.kserve import infer
from server.transport.rest_codec import (
    INFERENCE_HEADER,
    classify_request,
    infer_response_body,
    message_json,
    parse_classify_json,
    parse_infer_request,
)
from server.transport.security import AUTHORIZATION, BearerTokens, load_tokens, ssl_context

log = logging.getLogger("slimserve.rest")

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.CANCELLED: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
"""The HTTP status for each gRPC code, as Triton's HTTP endpoint maps them (others: 400)."""
OPEN_PREFIX = "/v2/health/"
"""Liveness and readiness: probes must work without credentials."""
METHOD_PREFIX = "rest."
"""Request metrics label REST calls ``rest.ModelInfer`` and ``rest.Classify`` (gRPC: ``ModelInfer``...)."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RestEndpoint:
    """The HTTP listener: ``start`` binds (port 0 = any free port), ``stop`` closes it after the drain."""

    def __init__(
        self,
        plane: DataPlane,
        is_ready: Callable[[], bool],
        settings: ServerSettings,
        model_control: views.ModelControl | None = None,
    ) -> None:
        self.plane = plane
        self._is_ready = is_ready
        self._settings = settings
        self._model_control = model_control
        self._tokens = BearerTokens(load_tokens(settings.auth)) if settings.auth.enabled else None
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        middlewares = [self._errors_as_json] + ([self._authenticate] if self._tokens is not None else [])
        app = web.Application(client_max_size=self._settings.max_message_bytes, middlewares=middlewares)
        get, post = web.get, web.post
        app.add_routes(
            [
                get("/v2/health/live", self.live),
                get("/v2/health/ready", self.ready),
                get("/v2", self.server_metadata),
                post("/v2/repository/index", self.repository_index),
                post("/v2/repository/models/{model}/load", self.load_model),
                post("/v2/repository/models/{model}/unload", self.unload_model),
                get("/v2/models/stats", self.statistics),
                *_model_routes(get, "", self.model_metadata),
                *_model_routes(get, "/ready", self.model_ready),
                *_model_routes(get, "/config", self.model_config),
                *_model_routes(get, "/stats", self.statistics),
                *_model_routes(post, "/infer", self.infer),
                *_model_routes(post, "/classify", self.classify),
            ]
        )
        return app

    async def start(self, host: str, port: int) -> None:
        tls = self._settings.tls
        context = ssl_context(tls) if tls.enabled else None
        # NOTE: no access log: one line per request would cost more than serving a small model.
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=context, reuse_port=False)
        await site.start()
        server = site._server  # NOTE: aiohttp exposes the bound port only on the asyncio server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # --- health and metadata -------------------------------------------------------------------

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self._is_ready()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(message_json(views.server_metadata()))

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        return web.json_response(message_json(views.model_metadata(self.plane.registry, name, version)))

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        self.plane.registry.get(name).resolve(version)  # NOTE: an unknown model or version is a 404
        ready = views.model_ready(self.plane.registry, self._is_ready(), name, version)
        return web.json_response({"name": name, "ready": ready}, status=200 if ready else 503)

    async def model_config(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        return web.json_response(message_json(views.model_config(self.plane.registry, name, version).config))

    async def statistics(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        return web.json_response(message_json(views.model_statistics(self.plane.registry, name, version)))

    async def repository_index(self, request: web.Request) -> web.Response:
        index = views.repository_index(self.plane.registry)
        return web.json_response([message_json(model) for model in index.models])

    async def load_model(self, request: web.Request) -> web.Response:
        """``{"parameters": {"config": "<JSON model entry>"}}``, as ``tritonclient.http``'s ``load_model`` sends."""
        body = await _body(request)
        try:
            document = json.loads(body) if body.strip() else {}
        except (ValueError, RecursionError) as exc:
            raise InvalidArgument(f"the load request is not valid JSON: {exc}") from None
        parameters = document.get("parameters", {}) if isinstance(document, dict) else None
        if not isinstance(parameters, dict):
            raise InvalidArgument("the load request must be a JSON object whose 'parameters' is an object")
        await views.load_model(self._model_control, request.match_info["model"], parameters)
        return web.json_response({})

    async def unload_model(self, request: web.Request) -> web.Response:
        await views.unload_model(self._model_control, request.match_info["model"])
        return web.json_response({})

    # --- inference -----------------------------------------------------------------------------

    async def infer(self, request: web.Request) -> web.Response:
        name, version = _model(request)

        async def run(track: RequestTrack) -> web.Response:
            self.plane.registry.get(name).resolve(version)  # NOTE: an unknown model is a 404 whatever the body
            body = await _body(request)
            parsed = parse_infer_request(body, request.headers.get(INFERENCE_HEADER), name, version)
            response = await infer(self.plane, parsed.request, track)
            payload, header_length = infer_response_body(response, parsed)
            if header_length is None:
                return web.Response(body=payload, content_type="application/json")
            headers = {INFERENCE_HEADER: str(header_length)}
            return web.Response(body=payload, headers=headers, content_type="application/octet-stream")

        return await self._tracked(request, "ModelInfer", run)

    async def classify(self, request: web.Request) -> web.Response:
        name, version = _model(request)

        async def run(track: RequestTrack) -> web.Response:
            if request.content_type.startswith("multipart/"):
                limit = self.plane.registry.get(name).settings.max_images_per_request  # NOTE: unknown model: 404
                message = await _multipart_classify(request, name, version, self._settings.max_message_bytes, limit)
            elif request.content_type in ("application/json", "application/octet-stream") or not request.body_exists:
                message = parse_classify_json(await _body(request), name, version)
            else:
                raise ServingError(
                    f"unsupported Content-Type {request.content_type!r}: send multipart/form-data image files or "
                    "JSON with base64 'images'",
                    code=grpc.StatusCode.INVALID_ARGUMENT,
                )
            return web.json_response(message_json(await classify(self.plane, message, track)))

        return await self._tracked(request, "Classify", run)

    async def _tracked(
        self, request: web.Request, method: str, run: Callable[[RequestTrack], Awaitable[web.Response]]
    ) -> web.Response:
        """Count (and trace) the request like its gRPC twin; refuse it while the server is not ready."""
        track = self.plane.track(METHOD_PREFIX + method)
        if self.plane.tracer is not None:
            _start_span(self.plane.tracer, track, request, METHOD_PREFIX + method)
        try:
            if not self._is_ready():
                raise Unavailable("the server is not ready")
            response = await run(track)
        except asyncio.CancelledError:
            track.finish(grpc.StatusCode.CANCELLED, http_status=499)
            raise
        except web.HTTPRequestEntityTooLarge as exc:
            message = _too_large(self._settings.max_message_bytes)
            track.finish(grpc.StatusCode.RESOURCE_EXHAUSTED, message, exc.status)
            return _error(exc.status, message)
        except Exception as exc:  # noqa: BLE001 - every failure must reach the caller as a status
            code, message = status_for(exc)
            status = HTTP_STATUS.get(code, 400)
            track.finish(code, message, status)
            return _error(status, message)
        track.finish(grpc.StatusCode.OK, http_status=response.status)
        return response

    # --- middlewares ---------------------------------------------------------------------------

    @web.middleware
    async def _errors_as_json(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every error answers ``{"error": ...}``: ServingError with its status, aiohttp's own (404 route,
        405 method, 413 body) with theirs, anything else 500 (logged)."""
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge as exc:
            return _error(exc.status, _too_large(self._settings.max_message_bytes))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(exc.status, f"{exc.reason}: {request.method} {request.path}")
        except Exception as exc:  # noqa: BLE001 - unexpected errors become 500 with their message
            code, message = status_for(exc)
            return _error(HTTP_STATUS.get(code, 400), message)

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        assert self._tokens is not None
        if request.path.startswith(OPEN_PREFIX):
            return await handler(request)
        problem = self._tokens.problem(request.headers.get(AUTHORIZATION), carrier="header")
        if problem is None:
            return await handler(request)
        log.debug("refused %s %s: %s", request.method, request.path, problem)
        response = _error(401, problem)
        response.headers["WWW-Authenticate"] = "Bearer"
        return response


def _start_span(tracer: Tracer, track: RequestTrack, request: web.Request, method: str) -> None:
    """The request's server span (HTTP semantic conventions), a child of the caller's ``traceparent`` header."""
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else request.path
    attributes = {
        "http.request.method": request.method,
        "http.route": route,
        "url.path": request.path,
        "url.scheme": request.scheme,
        tracing.METHOD: method,
    }
    track.start_span(tracer, f"{request.method} {route}", request.headers, attributes)


def _model_routes(route: Callable[..., Any], suffix: str, handler: Handler) -> list[Any]:
    return [
        route(f"/v2/models/{{model}}{suffix}", handler),
        route(f"/v2/models/{{model}}/versions/{{version}}{suffix}", handler),
    ]


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info.get("model", ""), request.match_info.get("version", "")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _too_large(limit: int) -> str:
    return f"request body exceeds the limit of {limit} bytes (server.max_message_bytes)"


async def _multipart_classify(request: web.Request, name: str, version: str, max_bytes: int, max_images: int) -> Any:
    """Each file part is an image; a field named ``top_k`` sets k.

    The whole body is held to ``max_bytes`` (aiohttp's ``client_max_size`` bounds each part alone, so many
    parts could add up to any size), reading stops at image ``max_images + 1``, and a body aiohttp cannot
    parse (no boundary, truncated, nested multipart) is the client's error, not the server's."""
    images: list[bytes] = []
    top_k: object = 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise InvalidArgument("nested multipart bodies are not supported: send each image as its own part")
            data = bytearray()
            while not part.at_eof():
                data.extend(await part.read_chunk())
                if request.content.total_bytes > max_bytes:
                    raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=request.content.total_bytes)
            if part.name == "top_k" and part.filename is None:
                top_k = bytes(data).decode(errors="replace").strip()
            elif len(images) == max_images:
                raise InvalidArgument(f"more than {max_images} images in one request; the limit is {max_images}")
            else:
                images.append(bytes(data))
    except ValueError as exc:  # NOTE: aiohttp's multipart parser reports malformed input as ValueError
        raise InvalidArgument(f"malformed multipart body: {exc}") from None
    except RequestPayloadError as exc:
        raise _unreadable(exc) from None
    return classify_request(name, version, images, top_k)


async def _body(request: web.Request) -> bytes:
    """The whole body (at most ``client_max_size`` bytes, else 413)."""
    try:
        return await request.read()
    except RequestPayloadError as exc:
        raise _unreadable(exc) from None


def _unreadable(exc: RequestPayloadError) -> InvalidArgument:
    """A body that cannot be read as sent (bad gzip or deflate data, broken chunked encoding) is the client's
    error: aiohttp's parser error is the cause, with the message."""
    return InvalidArgument(f"cannot read the request body: {getattr(exc.__cause__, 'message', None) or exc}")
