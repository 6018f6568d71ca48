"""What OpenTelemetry tracing costs a request: off vs on with sampling 0 vs on with sampling 1.0.

    .venv/bin/python -m benchmarks.tracing_overhead                          # digits, concurrency 1 and 8
    .venv/bin/python -m benchmarks.tracing_overhead --rounds 10 --block-s 3 --concurrency 1 8 32
    .venv/bin/python -m benchmarks.tracing_overhead --torch-threads 1   # OMP_NUM_THREADS=1 in the servers

Four ``slimserve serve`` processes serve the bundled digits model (no compression), identical but for
``server.tracing``: ``off`` (the default) twice, the second as an A/A control (what two identical servers
differ by: the noise floor), ``on, sampling 0`` (a tracer, every new trace dropped by the sampler) and
``on, sampling 1.0`` (every request recorded and exported). The two traced ones export over
OTLP/gRPC to a receiver in a fifth process that counts the spans and drops them (what a Collector's
receiver does before its pipeline). gRPC ModelInfer requests at batch 1 without a ``traceparent`` (the
server decides) are sent at each concurrency in blocks of ``--block-s`` seconds that alternate between
the servers, in a rotating order, ``--rounds`` times, so that all of them see the same drift of a
shared machine. Prints, per concurrency and mode, p50 and p99 latency and throughput over all its
blocks, and the median over rounds of the per-round p50 difference from ``off`` with its 95% bootstrap
interval: a mode costs something measurable when its interval excludes 0, unlike the A/A control's.

``--torch-threads 1`` runs the servers with one OpenMP thread: on a 2-core host shared with other jobs, a
2-thread team stalls at its barriers whenever a core is taken (tens of ms per forward pass, in bursts),
which buries a sub-millisecond difference; tracing's cost is on the event loop, not in the forward pass.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import yaml

from benchmarks.common import REPO_ROOT, ServerProcess, free_port, slimserve_process, table
from clients.loadgen import LoadResult, infer_call, open_channel, run_load
from compression.models.names import INPUT_NAME
from server.config.settings import TracingSettings, default_config

MODES = {
    "off": TracingSettings(),
    "off (A/A control)": TracingSettings(),
    "on, sampling 0": TracingSettings(enabled=True, sampling_ratio=0.0),
    "on, sampling 1.0": TracingSettings(enabled=True, sampling_ratio=1.0),
}
SHAPE = [1, 1, 28, 28]
WARMUP_S = 0.5
"""Untimed start of every block (the first requests after a switch wake a server that sat idle)."""


@dataclass
class Samples:
    latencies_ms: list[np.ndarray] = field(default_factory=list)
    count: int = 0
    elapsed_s: float = 0.0
    errors: int = 0
    block_p50_ms: list[float] = field(default_factory=list)

    def add(self, result: LoadResult) -> None:
        self.latencies_ms.append(result.latencies_ms)
        self.count += result.count
        self.elapsed_s += result.elapsed_s
        self.errors += result.error_count
        self.block_p50_ms.append(result.p50_ms)

    def percentile(self, q: float) -> float:
        return float(np.percentile(np.concatenate(self.latencies_ms), q))


def receive(port: int) -> None:
    """The receiver process: count the spans of every OTLP export until SIGTERM, then print the count."""
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    spans = 0
    lock = threading.Lock()

    class Counter(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: object, context: object) -> object:  # noqa: N802 - the gRPC method's name
            nonlocal spans
            count = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)  # type: ignore[attr-defined]
            with lock:
                spans += count
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Counter(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    server.stop(None)
    print(spans, flush=True)


@contextmanager
def receiver_process(port: int) -> Iterator[list[int]]:
    """The receiver in its own process; after the block, the list holds the number of spans it received."""
    command = [sys.executable, "-m", "benchmarks.tracing_overhead", "--receive", str(port)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        raise RuntimeError("the OTLP receiver did not start")
    received: list[int] = []
    try:
        yield received
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
        received.append(int(out.strip().splitlines()[-1]))


def config_file(folder: Path, mode: str, endpoint: str) -> Path:
    config = default_config()
    models = [m.model_copy(update={"compression": None}) for m in config.models]
    tracing = MODES[mode].model_copy(update={"otlp_endpoint": endpoint})
    server = config.server.model_copy(update={"tracing": tracing})
    path = folder / f"mode-{list(MODES).index(mode)}.yaml"
    document = config.model_copy(update={"models": models, "server": server}).model_dump(mode="json")
    path.write_text(yaml.safe_dump(document))
    return path


async def measure(
    servers: dict[str, ServerProcess], levels: list[int], rounds: int, block_s: float
) -> dict[int, dict[str, Samples]]:
    channels = {mode: open_channel(server.address) for mode, server in servers.items()}
    calls = {mode: infer_call(channel, "digits", INPUT_NAME, SHAPE) for mode, channel in channels.items()}
    results: dict[int, dict[str, Samples]] = {}
    try:
        for call in calls.values():
            await run_load(call, concurrency=max(levels), duration_s=1.0, warmup_s=1.0)
        modes = list(servers)
        for level in levels:
            results[level] = {mode: Samples() for mode in modes}
            for round_ in range(rounds):
                order = modes[round_ % len(modes) :] + modes[: round_ % len(modes)]
                for mode in order:
                    result = await run_load(calls[mode], concurrency=level, duration_s=block_s, warmup_s=WARMUP_S)
                    results[level][mode].add(result)
                p50s = ", ".join(f"{mode} {results[level][mode].block_p50_ms[-1]:.3f}" for mode in modes)
                print(f"concurrency {level}, round {round_ + 1}/{rounds}: p50 ms {p50s}", file=sys.stderr, flush=True)
    finally:
        for channel in channels.values():
            await channel.close()
    return results


def bootstrap_median_ci(values: np.ndarray, resamples: int = 10_000) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median of ``values``."""
    rng = np.random.default_rng(0)
    medians = np.median(rng.choice(values, size=(resamples, len(values)), replace=True), axis=1)
    return float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))


def report(results: dict[int, dict[str, Samples]], spans: int | None, load: str) -> str:
    threads = os.environ.get("OMP_NUM_THREADS", "torch's default")
    lines = [f"1-minute load average before the run: {load}; server OMP_NUM_THREADS: {threads}", ""]
    headers = [
        "concurrency",
        "tracing",
        "p50 ms",
        "p99 ms",
        "req/s",
        "p50 minus off's: median of rounds [95% CI]",
        "errors",
    ]
    rows = []
    for level, by_mode in results.items():
        off = by_mode["off"]
        for mode, samples in by_mode.items():
            diffs = np.subtract(samples.block_p50_ms, off.block_p50_ms) * 1e3
            low, high = bootstrap_median_ci(diffs)
            delta = "" if mode == "off" else f"{np.median(diffs):+.0f} µs [{low:+.0f}, {high:+.0f}]"
            rows.append(
                [
                    str(level),
                    mode,
                    f"{samples.percentile(50):.3f}",
                    f"{samples.percentile(99):.3f}",
                    f"{samples.count / samples.elapsed_s:.0f}",
                    delta,
                    str(samples.errors),
                ]
            )
    lines.append(table(headers, rows))
    lines.append("")
    traced = sum(by_mode["on, sampling 1.0"].count for by_mode in results.values())
    if spans is not None:
        lines.append(f"spans received by the OTLP receiver: {spans} (timed requests at sampling 1.0: {traced})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--block-s", type=float, default=3.0)
    parser.add_argument("--torch-threads", type=int, help="OMP_NUM_THREADS for the servers (default: torch's)")
    parser.add_argument("--receive", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.receive is not None:
        receive(args.receive)
        return
    load = open("/proc/loadavg").read().split()[0] if os.path.exists("/proc/loadavg") else "n/a"
    if args.torch_threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)  # NOTE: inherited by the server processes
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="slimserve-tracing-") as folder, ExitStack() as stack:
        received = stack.enter_context(receiver_process(port))
        servers = {
            mode: stack.enter_context(slimserve_process(config_file(Path(folder), mode, f"http://127.0.0.1:{port}")))
            for mode in MODES
        }
        results = asyncio.run(measure(servers, args.concurrency, args.rounds, args.block_s))
        stack.close()  # NOTE: servers first (they flush their spans on SIGTERM), then the receiver counts
        print(report(results, received[0] if received else None, load))


if __name__ == "__main__":
    main()
