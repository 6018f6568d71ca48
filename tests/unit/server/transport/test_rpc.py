"""The servicer decorators: a ``ServingError`` aborts with its own status and message, anything else aborts
INTERNAL and is logged, a cancelled call is counted as CANCELLED or DEADLINE_EXCEEDED, and ``tracked``
accounts every request (counter, in-flight gauge, per-variant statistics) through a real data plane."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from torch import nn

from compression.models.images import ImagePreprocessor
from compression.models.names import ORIGINAL
from compression.models.settings import BuiltinSource, PreprocessingSettings
from protos.errors import InvalidArgument, NotFound, ServingError
from server.config.settings import ModelSettings
from server.dataplane import DataPlane, RequestTrack
from server.observability.metrics import ServerMetrics
from server.transport.rpc import DEADLINE_SLACK_S, aborts_on_error, cancelled_code, tracked
from server.variants.registry import ModelRegistry, ServedModel

PRE = PreprocessingSettings(channels=1, resize=8, crop=8, mean=(0.5,), std=(0.5,))


class Aborted(Exception):
    """What grpc.aio's ``context.abort`` does: raise, so the handler ends."""


class Context:
    """The part of ``grpc.aio.ServicerContext`` the decorators use."""

    def __init__(self, time_remaining: float | None = None) -> None:
        self.aborts: list[tuple[grpc.StatusCode, str]] = []
        self._remaining = time_remaining

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self.aborts.append((code, details))
        raise Aborted(details)

    def time_remaining(self) -> float | None:
        return self._remaining


class Servicer:
    """A servicer whose methods do what each test asks, on a real data plane with one tiny model."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    @aborts_on_error
    async def Plain(self, request: object, context: Context) -> str:
        if isinstance(request, BaseException):
            raise request
        return f"answer to {request}"

    @tracked("Infer")
    async def Infer(self, request: object, track: RequestTrack) -> np.ndarray:
        """``request``: a model name to infer on, or an exception to raise once the variant is bound."""
        _, variant = self.plane.resolve(request if isinstance(request, str) else "tiny", "", track)
        if isinstance(request, BaseException):
            raise request
        return await self.plane.infer(variant, np.ones((2, 1, 8, 8), np.float32), track)


def serve(scenario):  # type: ignore[no-untyped-def]
    """Run ``scenario(servicer, metrics)`` on a fresh loop with a real registry, batcher and data plane."""

    async def main():  # type: ignore[no-untyped-def]
        with ThreadPoolExecutor(1) as executor:
            metrics = ServerMetrics(CollectorRegistry())
            registry = ModelRegistry(metrics, executor)
            settings = ModelSettings(name="tiny", source=BuiltinSource(), labels=list("abcd"), preprocessing=PRE)
            model = ServedModel(settings, list("abcd"), (1, 8, 8), 4, ImagePreprocessor(PRE, 10_000))
            registry.add_model(model)
            registry.add_variant(model, ORIGINAL, nn.Sequential(nn.Flatten(), nn.Linear(64, 4)).eval())
            try:
                return await scenario(Servicer(DataPlane(registry, metrics, executor)), metrics)
            finally:
                await registry.stop()

    return asyncio.run(main())


def requests(metrics: ServerMetrics, code: str, model: str = "tiny", variant: str = ORIGINAL) -> float | None:
    labels = {"model": model, "variant": variant, "method": "Infer", "code": code}
    return metrics.registry.get_sample_value("slimserve_requests_total", labels)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (NotFound("unknown model 'x'"), grpc.StatusCode.NOT_FOUND),
        (InvalidArgument("batch size 9 is outside 1..8"), grpc.StatusCode.INVALID_ARGUMENT),
        (ServingError("draining", code=grpc.StatusCode.UNAVAILABLE), grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_a_serving_error_aborts_with_its_status_and_message(error: ServingError, code: grpc.StatusCode) -> None:
    context = Context()
    with pytest.raises(Aborted):
        serve(lambda servicer, _: servicer.Plain(error, context))
    assert context.aborts == [(code, str(error))]


def test_success_passes_through_without_abort_and_keeps_the_method_name() -> None:
    context = Context()
    assert serve(lambda servicer, _: servicer.Plain("ping", context)) == "answer to ping"
    assert context.aborts == [] and Servicer.Plain.__name__ == "Plain"


def test_an_unexpected_error_aborts_internal_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    context = Context()
    with caplog.at_level(logging.ERROR, logger="slimserve"), pytest.raises(Aborted):
        serve(lambda servicer, _: servicer.Plain(ZeroDivisionError("division by zero"), context))
    assert context.aborts == [(grpc.StatusCode.INTERNAL, "internal error: ZeroDivisionError: division by zero")]
    [record] = [r for r in caplog.records if r.name == "slimserve.dataplane"]
    assert record.exc_info is not None and record.exc_info[0] is ZeroDivisionError


def test_tracked_success_counts_ok_with_timings_and_clears_in_flight() -> None:
    async def scenario(servicer: Servicer, metrics: ServerMetrics) -> tuple[np.ndarray, int, int, ServerMetrics]:
        outputs = await servicer.Infer("tiny", Context())
        stats = servicer.plane.registry.get("tiny").resolve("").stats
        return outputs, servicer.plane.active_requests, stats.success.count, metrics

    outputs, active, successes, metrics = serve(scenario)
    assert outputs.shape == (2, 4) and active == 0 and successes == 1
    assert requests(metrics, "OK") == 1
    duration = {"model": "tiny", "variant": ORIGINAL, "method": "Infer"}
    assert metrics.registry.get_sample_value("slimserve_request_duration_seconds_count", duration) == 1


def test_tracked_unknown_model_is_not_found_and_counted_without_a_variant() -> None:
    context = Context()
    metrics_seen: list[ServerMetrics] = []

    async def scenario(servicer: Servicer, metrics: ServerMetrics) -> None:
        metrics_seen.append(metrics)
        await servicer.Infer("nope", context)

    with pytest.raises(Aborted):
        serve(scenario)
    assert context.aborts == [(grpc.StatusCode.NOT_FOUND, "unknown model 'nope'; this server serves: tiny")]
    assert requests(metrics_seen[0], "NOT_FOUND", model="", variant="") == 1


def test_tracked_error_aborts_and_counts_the_status() -> None:
    metrics_seen: list[ServerMetrics] = []
    context = Context()

    async def scenario(servicer: Servicer, metrics: ServerMetrics) -> None:
        metrics_seen.append(metrics)
        try:
            await servicer.Infer(InvalidArgument("bad rows"), context)
        finally:
            assert servicer.plane.active_requests == 0
            assert servicer.plane.registry.get("tiny").resolve("").stats.fail.count == 1

    with pytest.raises(Aborted):
        serve(scenario)
    [metrics] = metrics_seen
    assert context.aborts == [(grpc.StatusCode.INVALID_ARGUMENT, "bad rows")]
    assert requests(metrics, "INVALID_ARGUMENT") == 1 and requests(metrics, "OK") is None
    inflight = {"model": "tiny", "variant": ORIGINAL}
    assert metrics.registry.get_sample_value("slimserve_inflight_requests", inflight) == 0


@pytest.mark.parametrize(
    ("remaining", "code"),
    [(None, "CANCELLED"), (5.0, "CANCELLED"), (DEADLINE_SLACK_S / 2, "DEADLINE_EXCEEDED")],
)
def test_tracked_cancellation_is_counted_by_why_and_not_aborted(remaining: float | None, code: str) -> None:
    metrics_seen: list[ServerMetrics] = []
    context = Context(remaining)

    async def scenario(servicer: Servicer, metrics: ServerMetrics) -> None:
        metrics_seen.append(metrics)
        await servicer.Infer(asyncio.CancelledError(), context)

    with pytest.raises(asyncio.CancelledError):
        serve(scenario)
    assert context.aborts == [] and requests(metrics_seen[0], code) == 1
    assert cancelled_code(context).name == code  # type: ignore[arg-type]
