"""A closed-loop load generator over grpc.aio.

Each of `concurrency` workers sends one request, awaits its reply, records the
latency and sends the next, until the run's deadline. Requests started during
the warm-up are sent but not recorded. Throughput is the number of successful
recorded requests over the time from the end of the warm-up until the last
in-flight request finished.

    async with open_channel("localhost:8001") as channel:
        call = infer_call(channel, "digits", "input", [8, 1, 28, 28])
        print((await run_load(call, concurrency=4, duration_s=10, warmup_s=2)).format())
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import grpc
import numpy as np

from clients.client import CHANNEL_OPTIONS
from clients.codec import build_classify_request, build_infer_request
from clients.tls import Tls, aio_channel
from protos import classifier_pb2_grpc
from protos import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger("slimserve.loadgen")

Call = Callable[[], Awaitable[object]]
Metadata = Sequence[tuple[str, str]]


@dataclass(frozen=True)
class LoadResult:
    """What a load run measured. Latencies are of successful requests only."""

    count: int  # successful requests recorded
    errors: Mapping[str, int]  # failed requests recorded, by gRPC status code name
    elapsed_s: float  # measurement window
    concurrency: int
    throughput: float  # successful requests per second
    p50_ms: float
    p90_ms: float
    p99_ms: float
    latencies_ms: np.ndarray = field(repr=False, compare=False)

    @classmethod
    def from_latencies(
        cls, latencies_s: Sequence[float], errors: Mapping[str, int], *, elapsed_s: float, concurrency: int
    ) -> LoadResult:
        latencies_ms = np.asarray(latencies_s, dtype=np.float64) * 1e3
        if len(latencies_ms):
            p50, p90, p99 = np.percentile(latencies_ms, [50, 90, 99])
        else:
            p50 = p90 = p99 = float("nan")
        return cls(
            count=len(latencies_ms),
            errors=dict(errors),
            elapsed_s=elapsed_s,
            concurrency=concurrency,
            throughput=len(latencies_ms) / elapsed_s if elapsed_s > 0 else 0.0,
            p50_ms=float(p50),
            p90_ms=float(p90),
            p99_ms=float(p99),
            latencies_ms=latencies_ms,
        )

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def format(self) -> str:
        """A one-line summary."""
        errors = f"{self.error_count} errors"
        if self.errors:
            errors += " (" + ", ".join(f"{code} {n}" for code, n in sorted(self.errors.items())) + ")"
        return (
            f"{self.count} requests in {self.elapsed_s:.1f} s at concurrency {self.concurrency}: "
            f"{self.throughput:.1f} req/s, p50 {self.p50_ms:.2f} ms, p90 {self.p90_ms:.2f} ms, "
            f"p99 {self.p99_ms:.2f} ms, {errors}"
        )


async def run_load(make_call: Call, *, concurrency: int, duration_s: float, warmup_s: float = 0.0) -> LoadResult:
    """Drive `make_call` from `concurrency` closed-loop workers for `warmup_s` + `duration_s` seconds.

    A call that raises grpc.RpcError counts as an error under its status code;
    any other exception is a bug and propagates.
    """
    if concurrency < 1 or duration_s <= 0 or warmup_s < 0:
        raise ValueError("need concurrency >= 1, duration_s > 0 and warmup_s >= 0")
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    started = time.perf_counter()
    measure_from = started + warmup_s
    stop_at = measure_from + duration_s

    async def worker() -> None:
        while (start := time.perf_counter()) < stop_at:
            try:
                await make_call()
            except grpc.RpcError as exc:
                if start >= measure_from:
                    errors[exc.code().name] += 1
                continue
            if start >= measure_from:
                latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - measure_from
    result = LoadResult.from_latencies(latencies, errors, elapsed_s=elapsed, concurrency=concurrency)
    log.info("%s", result.format())
    return result


async def run_levels(
    address: str,
    make_call: Callable[[grpc.aio.Channel], Call],
    concurrency: Sequence[int],
    *,
    duration_s: float,
    warmup_s: float,
) -> dict[int, LoadResult]:
    """`run_load` at each concurrency in turn, over one channel to `address`; each level has its own warm-up."""
    channel = open_channel(address)
    try:
        call = make_call(channel)
        return {
            level: await run_load(call, concurrency=level, duration_s=duration_s, warmup_s=warmup_s)
            for level in concurrency
        }
    finally:
        await channel.close()


def open_channel(address: str, tls: Tls | None = None) -> grpc.aio.Channel:
    """A grpc.aio channel with slimserve's message limits (TLS when `tls` is given); create it inside the event loop."""
    return aio_channel(address, tls, CHANNEL_OPTIONS)


def classify_call(
    channel: grpc.aio.Channel,
    images: Sequence[bytes],
    *,
    model: str = "digits",
    top_k: int = 5,
    variant: str = "",
    metadata: Metadata = (),
) -> Call:
    """A call that sends one Classify request with `images`; the request is built once."""
    request = build_classify_request(images, model=model, top_k=top_k, variant=variant)
    return partial(classifier_pb2_grpc.ClassifierStub(channel).Classify, request, metadata=tuple(metadata))


def random_input(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """The FP32 tensor a load run sends: standard normal, the same for the same `shape` and `seed`."""
    return np.random.default_rng(seed).standard_normal(tuple(shape), dtype=np.float32)


def infer_call(
    channel: grpc.aio.Channel,
    model: str,
    input_name: str,
    shape: Sequence[int],
    *,
    version: str = "",
    metadata: Metadata = (),
    seed: int = 0,
) -> Call:
    """A call that sends one ModelInfer request with a random FP32 tensor of `shape`; built once."""
    array = random_input(shape, seed)
    request = build_infer_request(model, input_name, array, datatype="FP32", version=version)
    return partial(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer, request, metadata=tuple(metadata))
