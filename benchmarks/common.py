"""Shared pieces of the benchmarks: a real slimserve process on free loopback ports, and timing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.processes import free_port
from protos import grpc_service_pb2, grpc_service_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ServerProcess:
    address: str
    metrics_url: str
    process: subprocess.Popen[bytes]
    http_address: str = ""
    """host:port of the KServe v2 REST endpoint."""


@contextmanager
def slimserve_process(
    config: Path | None, *, log_path: Path | None = None, ready_timeout_s: float = 900, wait: bool = True
) -> Iterator[ServerProcess]:
    """``slimserve serve`` in its own process (its own GIL and cores), stopped with SIGTERM afterwards.

    With ``wait=False`` it yields as soon as the process has started (call :func:`wait_ready` later)."""
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    command = [
        sys.executable,
        "-m",
        "server.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http_port),
        "--metrics-port",
        str(metrics_port),
    ]
    if config is not None:
        command += ["--config", str(config)]
    log = open(log_path or os.devnull, "wb")
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{grpc_port}"
    try:
        if wait:
            wait_ready(address, process, ready_timeout_s)
        yield ServerProcess(address, f"http://127.0.0.1:{metrics_port}/metrics", process, f"127.0.0.1:{http_port}")
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


def wait_ready(address: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"slimserve exited with code {process.returncode} before it was ready")
        try:
            if stub.ServerReady(grpc_service_pb2.ServerReadyRequest(), timeout=1).ready:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"slimserve at {address} not ready after {timeout_s:.0f} s")


def time_calls(call: Callable[[], object], *, warmup: int, iterations: int) -> np.ndarray:
    """Seconds per call, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        call()
    samples = np.empty(iterations)
    for i in range(iterations):
        started = time.perf_counter()
        call()
        samples[i] = time.perf_counter() - started
    return samples


def metric_totals(metrics_url: str) -> dict[str, float]:
    """Every sample of the server's /metrics summed over its labels, by sample name."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


@dataclass(frozen=True)
class ServerSide:
    """What the server's own metrics say about a stretch of load: how full its batches were and where
    a request's time went inside the server (the rest of the end-to-end latency is transport)."""

    mean_batch: float
    forward_ms: float
    """Mean time of one batched forward pass (assembly included)."""
    queue_ms: float
    in_server_ms: float
    """Mean time from receiving a request to sending its response."""
    model_busy: float
    """Share of the wall-clock time the model spent in forward passes."""

    @classmethod
    def between(cls, before: dict[str, float], after: dict[str, float], seconds: float) -> ServerSide:
        delta = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}

        def mean(prefix: str, scale: float = 1e3) -> float:
            count = delta.get(f"{prefix}_count", 0.0)
            return scale * delta.get(f"{prefix}_sum", 0.0) / count if count else float("nan")

        return cls(
            mean_batch=mean("slimserve_batch_size", scale=1.0),
            forward_ms=mean("slimserve_compute_duration_seconds"),
            queue_ms=mean("slimserve_queue_duration_seconds"),
            in_server_ms=mean("slimserve_request_duration_seconds"),
            model_busy=delta.get("slimserve_compute_duration_seconds_sum", 0.0) / seconds,
        )


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, so output can be pasted into the README as is."""
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
