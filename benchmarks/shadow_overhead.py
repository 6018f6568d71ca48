"""What live shadow comparison costs callers: p50 at concurrency 32 with shadow 100% vs off, in one run.

    .venv/bin/python -m benchmarks.shadow_overhead                       # the bundled digits model
    .venv/bin/python -m benchmarks.shadow_overhead --config deploy/examples/resnet18.yaml --model resnet18

Two servers run the same deploy config and the same cached compressed variant, one with
``shadow.fraction: 1.0``, one with ``0``. Loads alternate between them round by round (only one is
loaded at a time), so machine noise hits both alike. Prints p50/p90/throughput of each, their ratios,
and how many sampled requests the shadowed server compared and dropped (it compares only while the
model is idle, so under saturation most samples are dropped, by design).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import yaml

from benchmarks.common import ServerProcess, metric_totals, slimserve_process, table
from clients.loadgen import LoadResult, infer_call, open_channel, run_load
from compression.models.loading import load_model
from compression.models.names import INPUT_NAME
from compression.search.pipeline import cached_entry
from server.config.settings import DeployConfig, default_config, load_config


def config_with_shadow(base: DeployConfig, model: str, fraction: float, folder: Path) -> Path:
    raw = base.model_dump(mode="json")
    for entry in raw["models"]:
        if entry["name"] == model:
            entry["shadow"]["fraction"] = fraction
    path = folder / f"shadow-{fraction}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def require_compressed(config: DeployConfig, model: str) -> tuple[int, int, int]:
    """The model's input shape; exits unless its compressed variant is cached (no search during the run)."""
    settings = next(m for m in config.models if m.name == model)
    loaded = load_model(settings, config.resolved_cache_dir())
    entry = cached_entry(settings, loaded, config.resolved_cache_dir()) if settings.compression else None
    if entry is None or entry.chosen_artifact is None:
        raise SystemExit(f"no compressed variant of {model!r} in the cache: run `slimserve compress` first")
    return loaded.input_shape


@contextmanager
def two_servers(base: DeployConfig, model: str) -> Iterator[dict[str, ServerProcess]]:
    with tempfile.TemporaryDirectory() as folder, ExitStack() as stack:
        yield {
            label: stack.enter_context(slimserve_process(config_with_shadow(base, model, fraction, Path(folder))))
            for label, fraction in (("shadow off", 0.0), ("shadow 100%", 1.0))
        }


async def load_once(address: str, model: str, shape: tuple[int, ...], concurrency: int, seconds: float) -> LoadResult:
    channel = open_channel(address)
    try:
        call = infer_call(channel, model, INPUT_NAME, [1, *shape])
        return await run_load(call, concurrency=concurrency, duration_s=seconds, warmup_s=1.0)
    finally:
        await channel.close()


def shadow_counts(metrics_url: str) -> tuple[float, float]:
    """(images compared, samples dropped) so far, from the server's /metrics."""
    totals = metric_totals(metrics_url)
    return totals.get("slimserve_shadow_comparisons_total", 0.0), totals.get("slimserve_shadow_dropped_total", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="deploy config (default: the bundled digits model)")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per round and server")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    base = load_config(args.config) if args.config else default_config()
    shape = require_compressed(base, args.model)
    results: dict[str, list[LoadResult]] = {}
    with two_servers(base, args.model) as servers:
        for _ in range(args.rounds):
            for label, server in servers.items():
                result = asyncio.run(load_once(server.address, args.model, shape, args.concurrency, args.seconds))
                results.setdefault(label, []).append(result)
        compared, dropped = shadow_counts(servers["shadow 100%"].metrics_url)

    def pooled(label: str) -> tuple[float, float, float, int]:
        latencies = np.concatenate([r.latencies_ms for r in results[label]])
        throughput = float(np.mean([r.throughput for r in results[label]]))
        errors = sum(r.error_count for r in results[label])
        return float(np.percentile(latencies, 50)), float(np.percentile(latencies, 90)), throughput, errors

    off, on = pooled("shadow off"), pooled("shadow 100%")
    print(f"\nmodel {args.model!r}, concurrency {args.concurrency}, {args.rounds} rounds x {args.seconds:.0f} s each\n")
    rows = [
        [label, f"{p50:.2f}", f"{p90:.2f}", f"{tput:.0f}", str(err)]
        for label, (p50, p90, tput, err) in (("shadow off", off), ("shadow 100%", on))
    ]
    rows.append(["ratio 100% / off", f"{on[0] / off[0]:.3f}", f"{on[1] / off[1]:.3f}", f"{on[2] / off[2]:.3f}", ""])
    print(table(["server", "p50 ms", "p90 ms", "req/s", "errors"], rows))
    sampled = compared + dropped
    print(f"\nshadowed server: {compared:.0f} images compared, {dropped:.0f} samples dropped (busy) of {sampled:.0f}")


if __name__ == "__main__":
    main()
