"""How much slimserve adds on top of the model: in-process forward vs gRPC and REST end to end, in one run.

    .venv/bin/python -m benchmarks.serve_overhead                     # the bundled digits model
    .venv/bin/python -m benchmarks.serve_overhead --config deploy/examples/resnet18.yaml --model resnet18
    .venv/bin/python -m benchmarks.serve_overhead --config deploy/examples/resnet50-gpu.yaml --model resnet50 \
        --device cuda --concurrency 1 8 64                            # on a GPU (benchmarks/device_config.py)
    .venv/bin/python -m benchmarks.serve_overhead --protocols grpc   # gRPC only (REST: --protocols http)

Prints (1) the in-process forward p50 at batch 1 vs the gRPC ModelInfer p50 and the REST infer p50 at
concurrency 1, timed in alternating blocks of calls, and their differences (the serving overhead), and
(2) gRPC and REST throughput at each concurrency vs the best in-process batched throughput of the same
model, with the server's own metrics for each level (mean batch, forward time, time in server, share of
time the model was busy). At each concurrency the protocols take turns in halves of the duration (gRPC,
REST, REST, gRPC), so that both see the same drift of a shared machine. REST requests are KServe v2
``POST /v2/models/{model}/versions/{version}/infer`` with the input in Triton's binary tensor extension
and binary outputs asked for, as ``tritonclient.http`` sends them by default, over keep-alive aiohttp
client connections; like the gRPC request, the body is built once. The original is measured without its
compression block (no background search during the load). The server runs in its own process; the load
generator shares the machine's cores with it, as any client on the same host would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import torch

from benchmarks.common import ServerProcess, ServerSide, metric_totals, slimserve_process, table, time_calls
from benchmarks.device_config import benchmark_config, device_name
from clients.loadgen import Call, LoadResult, infer_call, open_channel, random_input, run_levels, run_load
from compression.models.loading import load_model
from compression.models.names import INPUT_NAME, ORIGINAL
from compression.runtimes.predictor import Predictor
from compression.runtimes.realization import load_predictor
from compression.search.pipeline import cached_entry
from server.config.settings import ModelSettings, default_config, load_config
from server.process.allocator import keep_large_buffers_in_heap
from server.variants.original import original_predictor
from server.variants.registry import COMPRESSED_ALIAS

WARMUP_S = 2.0
BLOCK = 10
"""Calls per block when in-process, gRPC and REST batch-1 latency alternate."""
GRPC, HTTP = "grpc", "http"
PROTOCOLS = (GRPC, HTTP)
LABELS = {GRPC: "gRPC", HTTP: "REST"}
INFERENCE_HEADER = "Inference-Header-Content-Length"


def served_predictor(config_path: Path | None, model_name: str, variant: str) -> tuple[Predictor, ModelSettings]:
    """The predictor the server runs for ``variant``: the original, or the cached compressed artifact,
    in a process with the server's allocator settings."""
    keep_large_buffers_in_heap()
    config = load_config(config_path) if config_path else default_config()
    settings = next(m for m in config.models if m.name == model_name)
    loaded = load_model(settings, config.resolved_cache_dir())
    if variant == ORIGINAL:
        return original_predictor(loaded, settings), settings
    entry = cached_entry(settings, loaded, config.resolved_cache_dir()) if settings.compression else None
    if entry is None or entry.chosen_artifact is None:
        raise SystemExit(f"no compressed variant of {model_name!r} in the cache: run `slimserve compress` first")
    return load_predictor(entry.chosen_artifact, settings.device), settings


def in_process(
    forward: Predictor, settings: ModelSettings, iterations: int
) -> tuple[dict[int, float], tuple[int, int, int]]:
    """Rows/s at each batch size, and the input shape, of the predictor loaded as the server does."""
    loaded_shape = (settings.preprocessing.channels, settings.preprocessing.crop, settings.preprocessing.crop)
    max_batch = settings.batching.max_batch_size
    throughput = {}
    with torch.inference_mode():
        for size in sorted({1, 2, 4, 8, 16, 32, 64, max_batch}):
            if size > max_batch:
                continue
            batch = torch.randn(size, *loaded_shape)
            seconds = time_calls(lambda: forward(batch), warmup=3, iterations=max(5, iterations // size))
            throughput[size] = size / float(np.median(seconds))
    return throughput, loaded_shape


def in_process_figures(
    forward: Predictor, settings: ModelSettings, iterations: int
) -> tuple[float, dict[int, float], tuple[int, int, int]]:
    """Batch-1 forward p50 (ms), rows/s at each batch size, and the input shape of ``forward`` (for
    benchmarks that time the server separately, not interleaved)."""
    throughput, shape = in_process(forward, settings, iterations)
    batch = torch.randn(1, *shape)
    with torch.inference_mode():
        p50_ms = float(np.median(time_calls(lambda: forward(batch), warmup=10, iterations=iterations))) * 1e3
    return p50_ms, throughput, shape


def rest_infer_body(shape: Sequence[int], seed: int = 0) -> tuple[bytes, int]:
    """The body ``tritonclient.http`` sends for one FP32 input with binary data and no outputs named (all
    outputs binary), and the length of its JSON header; the tensor is :func:`random_input`, as over gRPC."""
    array = random_input(shape, seed)
    header = {
        "inputs": [
            {
                "name": INPUT_NAME,
                "shape": list(shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": array.nbytes},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return encoded + array.tobytes(), len(encoded)


class RestError(grpc.RpcError):
    """A REST answer other than 200, raised as an ``RpcError`` so that the load generator counts it as a
    failed request (under ``HTTP_<status>``) as it counts gRPC's, instead of stopping the run."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self._code = type("HttpStatus", (), {"name": f"HTTP_{status}"})()

    def code(self) -> object:
        return self._code


def rest_infer_call(
    session: aiohttp.ClientSession, http_address: str, model: str, shape: Sequence[int], *, version: str = ""
) -> Call:
    """A call that POSTs one v2 infer request with a random FP32 tensor of ``shape`` (binary extension);
    the body is built once, and the answer's JSON header is parsed, as a client would."""
    body, json_length = rest_infer_body(shape)
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    url = f"http://{http_address}{path}"
    headers = {INFERENCE_HEADER: str(json_length), "Content-Type": "application/octet-stream"}

    async def call() -> object:
        async with session.post(url, data=body, headers=headers) as response:
            payload = await response.read()
            if response.status != 200:
                raise RestError(response.status, payload)
            length = response.headers.get(INFERENCE_HEADER)
            return json.loads(payload[: int(length)] if length is not None else payload)

    return call


def rest_session(connections: int) -> aiohttp.ClientSession:
    """Keep-alive connections to the server (create it inside the event loop)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections), auto_decompress=False)


async def interleaved_batch_one(
    address: str, forward: Predictor, model: str, version: str, shape: tuple[int, ...], rounds: int
) -> tuple[float, float]:
    """p50 ms of the in-process forward and of a gRPC request at concurrency 1, batch 1, measured in
    alternating blocks so that both see the same machine (a shared host drifts by more than the overhead)."""
    p50 = await interleaved_protocols(address, None, forward, model, version, shape, rounds)
    return p50["in-process"], p50[GRPC]


async def interleaved_protocols(
    address: str | None,
    http_address: str | None,
    forward: Predictor,
    model: str,
    version: str,
    shape: tuple[int, ...],
    rounds: int,
) -> dict[str, float]:
    """p50 ms of the in-process forward (``"in-process"``) and of a request at concurrency 1, batch 1, over
    gRPC to ``address`` and REST to ``http_address`` (each where given), in alternating blocks."""
    channel = open_channel(address) if address else None
    session = rest_session(1) if http_address else None
    calls: dict[str, Call] = {}
    if channel is not None:
        calls[GRPC] = infer_call(channel, model, INPUT_NAME, [1, *shape], version=version)
    if session is not None and http_address:
        calls[HTTP] = rest_infer_call(session, http_address, model, [1, *shape], version=version)
    batch = torch.randn(1, *shape)
    samples: dict[str, list[float]] = {"in-process": [], **{name: [] for name in calls}}
    try:
        for call in calls.values():
            for _ in range(5):
                await call()
        for _ in range(rounds):
            with torch.inference_mode():
                samples["in-process"].extend(time_calls(lambda: forward(batch), warmup=2, iterations=BLOCK))
            for name, call in calls.items():
                for _ in range(BLOCK):
                    started = time.perf_counter()
                    await call()
                    samples[name].append(time.perf_counter() - started)
    finally:
        if channel is not None:
            await channel.close()
        if session is not None:
            await session.close()
    return {name: float(np.median(seconds)) * 1e3 for name, seconds in samples.items()}


async def protocol_load(
    server: ServerProcess,
    protocols: Sequence[str],
    model: str,
    version: str,
    shape: tuple[int, ...],
    concurrency: list[int],
    duration_s: float,
) -> dict[tuple[int, str], tuple[LoadResult, ServerSide]]:
    """Each concurrency level in turn; within a level, with more than one protocol, each protocol runs twice
    for half the duration, in mirrored order (gRPC, REST, REST, gRPC), and its halves are pooled. With the
    server's own account of each protocol's share (warm-ups included)."""
    if len(protocols) == 1:
        turns, seconds = list(protocols), duration_s
    else:
        turns, seconds = [*protocols, *reversed(protocols)], duration_s / 2
    results = {}
    for level in concurrency:
        latencies: dict[str, list[float]] = {p: [] for p in protocols}
        errors: dict[str, dict[str, int]] = {p: {} for p in protocols}
        elapsed = dict.fromkeys(protocols, 0.0)
        inside: dict[str, dict[str, float]] = {p: {} for p in protocols}
        inside_s = dict.fromkeys(protocols, 0.0)
        for protocol in turns:
            before, started = metric_totals(server.metrics_url), time.perf_counter()
            result = await _load_once(server, protocol, model, version, shape, level, seconds)
            after = metric_totals(server.metrics_url)
            inside_s[protocol] += time.perf_counter() - started
            for name, value in after.items():
                inside[protocol][name] = inside[protocol].get(name, 0.0) + value - before.get(name, 0.0)
            latencies[protocol].extend((result.latencies_ms / 1e3).tolist())
            for code, count in result.errors.items():
                errors[protocol][code] = errors[protocol].get(code, 0) + count
            elapsed[protocol] += result.elapsed_s
        for protocol in protocols:
            pooled = LoadResult.from_latencies(
                latencies[protocol], errors[protocol], elapsed_s=elapsed[protocol], concurrency=level
            )
            results[(level, protocol)] = (pooled, ServerSide.between({}, inside[protocol], inside_s[protocol]))
    return results


async def _load_once(
    server: ServerProcess, protocol: str, model: str, version: str, shape: tuple[int, ...], level: int, seconds: float
) -> LoadResult:
    if protocol == GRPC:

        def make_call(channel: grpc.aio.Channel) -> Call:
            return infer_call(channel, model, INPUT_NAME, [1, *shape], version=version)

        return (await run_levels(server.address, make_call, [level], duration_s=seconds, warmup_s=WARMUP_S))[level]
    async with rest_session(level) as session:
        call = rest_infer_call(session, server.http_address, model, [1, *shape], version=version)
        return await run_load(call, concurrency=level, duration_s=seconds, warmup_s=WARMUP_S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="deploy config (default: the bundled digits model)")
    parser.add_argument("--model", default="digits")
    parser.add_argument(
        "--variant",
        choices=[ORIGINAL, COMPRESSED_ALIAS],
        default=ORIGINAL,
        help="which variant to measure, in process and pinned over gRPC and REST (compressed: from the cache)",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per concurrency and protocol")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--iterations", type=int, default=200, help="in-process timed forward passes")
    parser.add_argument("--device", help="serve the model on this device instead (cuda, cuda:N): GPU batching defaults")
    parser.add_argument(
        "--protocols",
        nargs="+",
        choices=PROTOCOLS,
        default=list(PROTOCOLS),
        help="gRPC ModelInfer and/or REST (KServe v2 HTTP, binary tensors); default both",
    )
    args = parser.parse_args()
    protocols = [p for p in PROTOCOLS if p in args.protocols]
    args.config = benchmark_config(
        args.config, args.model, device=args.device, compression=args.variant == COMPRESSED_ALIAS
    )

    forward, settings = served_predictor(args.config, args.model, args.variant)
    batched, shape = in_process(forward, settings, args.iterations)
    best_size = max(batched, key=batched.__getitem__)
    with slimserve_process(args.config) as server:
        p50 = asyncio.run(
            interleaved_protocols(
                server.address if GRPC in protocols else None,
                server.http_address if HTTP in protocols else None,
                forward,
                args.model,
                args.variant,
                shape,
                max(1, args.iterations // BLOCK),
            )
        )
        results = asyncio.run(
            protocol_load(server, protocols, args.model, args.variant, shape, args.concurrency, args.duration)
        )

    print(
        f"\nmodel {args.model!r}, variant {args.variant!r}, input {[1, *shape]}, "
        f"on {device_name(args.config, args.model)}, {torch.get_num_threads()} torch threads\n"
    )
    forward_p50 = p50["in-process"]
    single = [["in-process forward, batch 1", f"{forward_p50:.3f}"]]
    what = {GRPC: "gRPC ModelInfer", HTTP: "REST infer (binary tensors)"}
    single += [[f"{what[p]}, concurrency 1", f"{p50[p]:.3f}"] for p in protocols]
    if len(protocols) == 1:
        single.append(["serving overhead (difference)", f"{p50[protocols[0]] - forward_p50:.3f}"])
    else:
        single += [[f"serving overhead, {LABELS[p]} (difference)", f"{p50[p] - forward_p50:.3f}"] for p in protocols]
    print(table(["measure (alternating blocks)", "p50 ms"], single))
    print()
    rows = [[f"in-process, batch {best_size} (best)", f"{batched[best_size]:.0f}", "", "", "1.00", "", "", "", ""]]
    for (level, protocol), (result, inside) in results.items():
        rows.append(
            [
                f"{LABELS[protocol]}, concurrency {level}",
                f"{result.throughput:.0f}",
                f"{result.p50_ms:.2f}",
                f"{result.p99_ms:.2f}",
                f"{result.throughput / batched[best_size]:.2f}",
                f"{inside.mean_batch:.1f}",
                f"{inside.forward_ms:.2f}",
                f"{inside.in_server_ms:.2f}",
                f"{inside.model_busy:.0%}",
            ]
        )
    headers = ["load", "images/s", "p50 ms", "p99 ms", "ratio to best in-process"]
    print(table([*headers, "server: mean batch", "forward ms", "in-server ms", "model busy"], rows))
    errors = sum(r.error_count for r, _ in results.values())
    if errors:
        failed = {f"{LABELS[p]} c{level}": r.errors for (level, p), (r, _) in results.items() if r.errors}
        print(f"\n{errors} requests failed: {failed}")


if __name__ == "__main__":
    main()
