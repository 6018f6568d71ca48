"""How much slimserve adds on top of the model: in-process forward vs gRPC end to end, in one run.

    .venv/bin/python -m benchmarks.serve_overhead                     # the bundled digits model
    .venv/bin/python -m benchmarks.serve_overhead --config deploy/examples/resnet18.yaml --model resnet18
    .venv/bin/python -m benchmarks.serve_overhead --config deploy/examples/resnet50-gpu.yaml --model resnet50 \
        --device cuda --concurrency 1 8 64                            # on a GPU (benchmarks/device_config.py)

Prints (1) the in-process forward p50 at batch 1 vs the gRPC ModelInfer p50 at concurrency 1, timed in
alternating blocks of calls, and their difference (the serving overhead), and (2) gRPC throughput at
each concurrency vs the best in-process batched throughput of the same model, with the server's own
metrics for each level (mean batch, forward time, time in server, share of time the model was busy).
The original is measured without its compression block (no background search during the load). The
server runs in its own process; the load generator shares the machine's cores with it, as any client on
the same host would.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import grpc
import numpy as np
import torch

from benchmarks.common import ServerProcess, ServerSide, metric_totals, slimserve_process, table, time_calls
from benchmarks.device_config import benchmark_config, device_name
from clients.loadgen import Call, LoadResult, infer_call, open_channel, run_levels
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
"""Calls per block when in-process and gRPC batch-1 latency alternate."""


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


async def interleaved_batch_one(
    address: str, forward: Predictor, model: str, version: str, shape: tuple[int, ...], rounds: int
) -> tuple[float, float]:
    """p50 ms of the in-process forward and of a gRPC request at concurrency 1, batch 1, measured in
    alternating blocks so that both see the same machine (a shared host drifts by more than the overhead)."""
    channel = open_channel(address)
    call = infer_call(channel, model, INPUT_NAME, [1, *shape], version=version)
    batch = torch.randn(1, *shape)
    local: list[float] = []
    remote: list[float] = []
    try:
        for _ in range(5):
            await call()
        for _ in range(rounds):
            with torch.inference_mode():
                local.extend(time_calls(lambda: forward(batch), warmup=2, iterations=BLOCK))
            for _ in range(BLOCK):
                started = time.perf_counter()
                await call()
                remote.append(time.perf_counter() - started)
    finally:
        await channel.close()
    return float(np.median(local)) * 1e3, float(np.median(remote)) * 1e3


async def grpc_load(
    server: ServerProcess, model: str, version: str, shape: tuple[int, ...], concurrency: list[int], duration_s: float
) -> dict[int, tuple[LoadResult, ServerSide]]:
    """Each concurrency level in turn, with the server's own account of it (warm-up included)."""

    def make_call(channel: grpc.aio.Channel) -> Call:
        return infer_call(channel, model, INPUT_NAME, [1, *shape], version=version)

    results = {}
    for level in concurrency:
        before, started = metric_totals(server.metrics_url), time.perf_counter()
        load = await run_levels(server.address, make_call, [level], duration_s=duration_s, warmup_s=WARMUP_S)
        inside = ServerSide.between(before, metric_totals(server.metrics_url), time.perf_counter() - started)
        results[level] = (load[level], inside)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="deploy config (default: the bundled digits model)")
    parser.add_argument("--model", default="digits")
    parser.add_argument(
        "--variant",
        choices=[ORIGINAL, COMPRESSED_ALIAS],
        default=ORIGINAL,
        help="which variant to measure, in process and pinned over gRPC (compressed: from the cache)",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--iterations", type=int, default=200, help="in-process timed forward passes")
    parser.add_argument("--device", help="serve the model on this device instead (cuda, cuda:N): GPU batching defaults")
    args = parser.parse_args()
    args.config = benchmark_config(
        args.config, args.model, device=args.device, compression=args.variant == COMPRESSED_ALIAS
    )

    forward, settings = served_predictor(args.config, args.model, args.variant)
    batched, shape = in_process(forward, settings, args.iterations)
    best_size = max(batched, key=batched.__getitem__)
    with slimserve_process(args.config) as server:
        forward_p50, c1_p50 = asyncio.run(
            interleaved_batch_one(
                server.address, forward, args.model, args.variant, shape, max(1, args.iterations // BLOCK)
            )
        )
        results = asyncio.run(grpc_load(server, args.model, args.variant, shape, args.concurrency, args.duration))

    print(
        f"\nmodel {args.model!r}, variant {args.variant!r}, input {[1, *shape]}, "
        f"on {device_name(args.config, args.model)}, {torch.get_num_threads()} torch threads\n"
    )
    print(
        table(
            ["measure (alternating blocks)", "p50 ms"],
            [
                ["in-process forward, batch 1", f"{forward_p50:.3f}"],
                ["gRPC ModelInfer, concurrency 1", f"{c1_p50:.3f}"],
                ["serving overhead (difference)", f"{c1_p50 - forward_p50:.3f}"],
            ],
        )
    )
    print()
    rows = [[f"in-process, batch {best_size} (best)", f"{batched[best_size]:.0f}", "", "", "1.00", "", "", "", ""]]
    for level, (result, inside) in results.items():
        rows.append(
            [
                f"gRPC, concurrency {level}",
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
        print(f"\n{errors} requests failed: {[r.errors for r, _ in results.values()]}")


if __name__ == "__main__":
    main()
