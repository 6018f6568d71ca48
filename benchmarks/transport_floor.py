"""What a batch-1 3x224x224 FP32 request costs before any model runs: the floor under slimserve's overhead.

    .venv/bin/python -m benchmarks.transport_floor                 # --rounds 30 --block 20

One client (the asyncio event loop the other benchmarks' load generator uses), concurrency 1, the same
602,112-byte request and a 4,000-byte answer (1000 FP32 logits), against, in alternating blocks:

1. raw TCP: an asyncio echo server on loopback (the kernel's share of a round trip);
2. bare gRPC: a grpc.aio KServe ``ModelInfer`` handler that answers without looking at the input, in
   its own process (what any Python gRPC server pays: HTTP/2, protobuf, the event loop);
3. slimserve serving a model whose forward pass takes microseconds (average pool + linear layer), so
   that its p50 minus the forward's is slimserve's own overhead, unblurred by a forward pass that
   varies by milliseconds on a shared host.

With ``--perf-analyzer``, Triton's C++ client (``benchmarks/perf_analyzer.sh``) then measures the same
slimserve process at concurrency 1 and prints the server's own breakdown of a request from
``ModelStatistics``. The differences between neighbouring rows are what each layer adds. Issue 6's target (p50 at
concurrency 1 minus the in-process forward p50 <= 1.0 ms) can be met only where row 2 leaves room.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import torch
import yaml
from torch import nn

from benchmarks.common import REPO_ROOT, slimserve_process, table, time_calls
from benchmarks.processes import spawned_server
from clients.loadgen import infer_call, open_channel
from compression.models.names import INPUT_NAME
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc

SHAPE = (1, 3, 224, 224)
REQUEST_BYTES = int(np.prod(SHAPE)) * 4
CLASSES = 1000
ANSWER_BYTES = CLASSES * 4
MODEL = "near-zero"
CONFIG = REPO_ROOT / "build" / "benchmarks" / "configs" / "near-zero.yaml"


def near_zero_model() -> nn.Module:
    """A classifier whose forward pass costs microseconds: what remains of a request's time is serving."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(SHAPE[1], CLASSES))


def write_config() -> Path:
    model = {
        "name": MODEL,
        "source": {"format": "python", "factory": "benchmarks.transport_floor:near_zero_model"},
        "labels": [f"class {i}" for i in range(CLASSES)],
        "preprocessing": {"channels": SHAPE[1], "resize": SHAPE[2], "crop": SHAPE[3]},
        "batching": {"max_batch_size": 16},
    }
    CONFIG.parent.mkdir(parents=True, exist_ok=True)
    CONFIG.write_text(yaml.safe_dump({"models": [model]}, sort_keys=False))
    return CONFIG


# --- the two servers without slimserve, each run in its own process --------------------------------------


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    answer = bytes(ANSWER_BYTES)
    try:
        while True:
            await reader.readexactly(REQUEST_BYTES)
            writer.write(answer)
            await writer.drain()
    except asyncio.IncompleteReadError:  # the client closed the connection
        writer.close()


async def _serve_tcp(port: int) -> None:
    server = await asyncio.start_server(_echo, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


class _BareInference(pb_grpc.GRPCInferenceServiceServicer):
    """Answers every ModelInfer with the same logits: only the transport is left to measure."""

    def __init__(self) -> None:
        self._output = pb.ModelInferResponse.InferOutputTensor(name="logits", datatype="FP32", shape=[1, CLASSES])
        self._raw = bytes(ANSWER_BYTES)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return pb.ModelInferResponse(
            model_name=request.model_name, id=request.id, outputs=[self._output], raw_output_contents=[self._raw]
        )


async def _serve_grpc(port: int) -> None:
    limit = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    server = grpc.aio.server(options=limit)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(_BareInference(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def _run_server(kind: str, port: int) -> None:
    asyncio.run(_serve_tcp(port) if kind == "tcp" else _serve_grpc(port))


@contextmanager
def bare_server(kind: str) -> Iterator[int]:
    """``kind`` ("tcp" or "grpc") in a fresh process on a free loopback port, until the block ends."""
    with spawned_server(_run_server, kind) as (port, _):
        yield port


# --- the client ------------------------------------------------------------------------------------------------

Call = Callable[[], Awaitable[object]]


async def tcp_call(port: int) -> tuple[Call, Callable[[], None]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32).tobytes()

    async def call() -> bytes:
        writer.write(request)
        await writer.drain()
        return await reader.readexactly(ANSWER_BYTES)

    return call, writer.close


async def alternate(calls: dict[str, Call], rounds: int, block: int) -> dict[str, np.ndarray]:
    """Latencies (ms) of each call, timed in alternating blocks of ``block`` calls after a warm-up."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        for _ in range(block):
            await call()
    for _ in range(rounds):
        for name, call in calls.items():
            for _ in range(block):
                started = time.perf_counter()
                await call()
                samples[name].append(time.perf_counter() - started)
    return {name: np.asarray(values) * 1e3 for name, values in samples.items()}


async def measure(
    tcp_port: int, grpc_port: int, slimserve_address: str, rounds: int, block: int
) -> dict[str, np.ndarray]:
    tcp, close_tcp = await tcp_call(tcp_port)
    bare_channel, slimserve_channel = open_channel(f"127.0.0.1:{grpc_port}"), open_channel(slimserve_address)
    try:
        calls = {
            "raw TCP echo": tcp,
            "bare grpc.aio ModelInfer": infer_call(bare_channel, MODEL, INPUT_NAME, SHAPE),
            "slimserve ModelInfer, near-zero model": infer_call(slimserve_channel, MODEL, INPUT_NAME, SHAPE),
        }
        return await alternate(calls, rounds, block)
    finally:
        close_tcp()
        await bare_channel.close()
        await slimserve_channel.close()


def in_process_forward_ms() -> float:
    model = near_zero_model().eval()
    batch = torch.randn(SHAPE)
    with torch.inference_mode():
        return float(np.median(time_calls(lambda: model(batch), warmup=20, iterations=500))) * 1e3


def perf_analyzer_lines(address: str) -> list[str]:
    """perf_analyzer's client p50 and server-side breakdown at concurrency 1 against ``address``."""
    command = ["bash", str(REPO_ROOT / "benchmarks" / "perf_analyzer.sh"), "-m", MODEL, "-u", address]
    command += ["--concurrency-range", "1", "--measurement-interval", "4000", "--percentile", "50"]
    command += ["--stability-percentage", "50"]  # a shared 2-core host rarely holds the default 10%
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wanted = re.compile(r"^\s*(p50 latency|Avg request latency|Throughput):")
    lines = [line.strip() for line in done.stdout.splitlines() if wanted.match(line)]
    return lines or [f"perf_analyzer failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()[-300:]}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="alternations of the three servers")
    parser.add_argument("--block", type=int, default=20, help="calls per server per round")
    parser.add_argument("--perf-analyzer", action="store_true", help="also measure slimserve with perf_analyzer")
    args = parser.parse_args()

    forward_ms = in_process_forward_ms()
    with bare_server("tcp") as tcp_port, bare_server("grpc") as grpc_port:
        with slimserve_process(write_config()) as slimserve:
            print(f"measuring {args.rounds} rounds of {args.block} calls per server ...", file=sys.stderr)
            latencies = asyncio.run(measure(tcp_port, grpc_port, slimserve.address, args.rounds, args.block))
            analyzed = perf_analyzer_lines(slimserve.address) if args.perf_analyzer else []

    print(
        f"\nbatch-1 FP32 {list(SHAPE)} requests ({REQUEST_BYTES:,} B), {ANSWER_BYTES:,} B answers, concurrency 1, "
        f"{args.rounds} alternating rounds of {args.block} calls; in-process forward of the near-zero model: "
        f"{forward_ms:.3f} ms p50\n"
    )
    rows, previous = [], None
    for name, values in latencies.items():
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        added = "" if previous is None else f"{p50 - previous:+.3f}"
        rows.append([name, f"{p50:.3f}", f"{p90:.3f}", f"{p99:.3f}", added])
        previous = p50
    print(table(["server", "p50 ms", "p90 ms", "p99 ms", "p50 added to the row above"], rows))
    slimserve_p50 = float(np.median(latencies["slimserve ModelInfer, near-zero model"]))
    print(f"\nslimserve p50 minus the in-process forward p50: {slimserve_p50 - forward_ms:.3f} ms")
    if analyzed:
        print("\nperf_analyzer against the same slimserve process, concurrency 1:\n  " + "\n  ".join(analyzed))


if __name__ == "__main__":
    main()
