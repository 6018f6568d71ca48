"""The serving policies under a step load: idle -> saturating -> idle, for ``original``, ``compressed`` and
``adaptive`` (one server process each, in turn), on resnet18 with random weights (latency only).

    .venv/bin/python -m benchmarks.adaptive                      # resnet18, CPU
    .venv/bin/python -m benchmarks.adaptive --phase-s 10 --clients 8

The compressed variant is the search's pick among lossless runtimes (ONNX Runtime fp32 here), so its
agreement with the original is 1.0 and the figures show latency alone; the objective is set from the
original's measured in-process forward time (``--slo-factor`` times its batch-1 p50), so it is met at
low load and missed under the saturating phase. Per phase and policy: p95 against the objective,
throughput, the share of answers by the original, and the "accuracy served" (each variant's top-1, or
agreement without labels, from the search report, weighted by its share). Goal (issue "Accuracy when
there is room"): ``adaptive`` holds the objective wherever ``compressed`` does, and the original gives
at least 90% of the answers in the idle phases.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import torch
import yaml

from benchmarks.common import slimserve_process, table
from compression.models.names import INPUT_NAME, ORIGINAL
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc

POLICIES = ("original", "compressed", "adaptive")
PHASES = (("idle", 1), ("saturating", 8), ("idle again", 1))


@dataclass
class Phase:
    name: str
    clients: int
    latencies_ms: list[float] = field(default_factory=list)
    answered_by: list[str] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0

    def p95(self) -> float:
        return float(np.percentile(self.latencies_ms, 95)) if self.latencies_ms else float("nan")

    def original_share(self) -> float:
        return self.answered_by.count(ORIGINAL) / max(1, len(self.answered_by))


def config(cache_dir: Path, data_file: Path, policy: str, slo_ms: float) -> dict:
    return {
        "cache_dir": str(cache_dir),
        "models": [
            {
                "name": "resnet18",
                "source": {"format": "torchvision", "architecture": "resnet18", "num_classes": 1000},
                "preprocessing": {"channels": 3, "resize": 256, "crop": 224},
                "batching": {"max_batch_size": 8},
                "compression": {
                    "budget": {"max_accuracy_drop": None, "min_agreement": 0.99},
                    "data": {
                        "source": "tensor_file",
                        "path": str(data_file),
                        "calibration_size": 32,
                        "validation_size": 32,
                    },
                    "measurement": {"warmup": 3, "iterations": 20},
                    "candidates": [
                        {"name": "onnxruntime-fp32", "realization": {"runtime": "onnxruntime", "precision": "fp32"}}
                    ],
                },
                "shadow": {"fraction": 0.0},
                "serving": {"policy": policy, "slo_p95_ms": slo_ms},
            }
        ],
    }


def original_forward_ms() -> float:
    """The original's in-process forward p50 at batch 1 (what the objective is set from)."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=1000).eval()
    x = torch.randn(1, 3, 224, 224)
    times = []
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        for _ in range(20):
            started = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def run_phase(address: str, phase: Phase, seconds: float) -> None:
    request = pb.ModelInferRequest(model_name="resnet18")
    tensor = request.inputs.add(name=INPUT_NAME, datatype="FP32", shape=[1, 3, 224, 224])
    del tensor
    request.raw_input_contents.append(np.random.default_rng(0).standard_normal((1, 3, 224, 224), np.float32).tobytes())
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        deadline = time.monotonic() + seconds

        async def client() -> None:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    response = await stub.ModelInfer(request)
                except grpc.aio.AioRpcError:
                    phase.errors += 1
                    continue
                phase.latencies_ms.append((time.perf_counter() - started) * 1000)
                phase.answered_by.append(response.model_version)

        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(phase.clients)))
        phase.seconds = time.monotonic() - started


def search_figures(cache_dir: Path) -> dict[str, float]:
    """Each variant's top-1 (or agreement without labels) from the cached search report."""
    (report_path,) = cache_dir.glob("compressed/resnet18/*/report.json")
    report = json.loads(report_path.read_text())
    figures = {}
    for variant in [report["original"], *report["candidates"]]:
        value = variant.get("top1") if variant.get("top1") is not None else variant.get("agreement")
        figures[variant["name"]] = 1.0 if variant["name"] == ORIGINAL and value is None else float(value)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase-s", type=float, default=12.0, help="seconds per phase")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients in the saturating phase")
    parser.add_argument("--slo-factor", type=float, default=3.0, help="objective = this x the original's forward p50")
    args = parser.parse_args()
    phases = ((PHASES[0]), (PHASES[1][0], args.clients), PHASES[2])
    forward_ms = original_forward_ms()
    slo_ms = round(args.slo_factor * forward_ms, 1)
    print(f"original forward p50 at batch 1: {forward_ms:.1f} ms; objective p95 <= {slo_ms} ms")
    work = Path(tempfile.mkdtemp(prefix="slimserve-adaptive-"))
    data_file = work / "images.pt"
    torch.save({"images": torch.randn(64, 3, 224, 224)}, data_file)
    results: dict[str, list[Phase]] = {}
    for policy in POLICIES:
        path = work / f"{policy}.yaml"
        path.write_text(yaml.safe_dump(config(work / "cache", data_file, policy, slo_ms)))
        with slimserve_process(path, log_path=work / f"{policy}.log") as server:
            # NOTE: wait for the compressed variant (searched once, then cached for the next policies)
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline and not list((work / "cache").glob("compressed/resnet18/*/report.json")):
                time.sleep(1)
            time.sleep(3)  # hot swap after the child process published the result
            results[policy] = []
            for name, clients in phases:
                phase = Phase(name, clients)
                asyncio.run(run_phase(server.address, phase, args.phase_s))
                results[policy].append(phase)
                rate = len(phase.latencies_ms) / phase.seconds
                print(
                    f"{policy:10s} {name:11s} p95 {phase.p95():7.1f} ms  {rate:6.1f} req/s  "
                    f"original {phase.original_share():.0%}  errors {phase.errors}"
                )
    figures = search_figures(work / "cache")
    rows = []
    for policy, phase_list in results.items():
        for phase in phase_list:
            served = [figures.get(v, float("nan")) for v in phase.answered_by]
            accuracy = float(np.mean(served)) if served else float("nan")
            rows.append(
                [
                    policy,
                    f"{phase.name} (c{phase.clients})",
                    f"{phase.p95():.1f}",
                    "yes" if phase.p95() <= slo_ms else "no",
                    f"{len(phase.latencies_ms) / phase.seconds:.1f}",
                    f"{phase.original_share():.0%}",
                    f"{accuracy:.4f}",
                    str(phase.errors),
                ]
            )
    headers = [
        "policy",
        "phase",
        "p95 ms",
        f"<= {slo_ms} ms",
        "req/s",
        "answered by original",
        "accuracy served",
        "errors",
    ]
    print()
    print(table(headers, rows))
    print(f"\nvariant figures from the search (top-1, or agreement with the original without labels): {figures}")


if __name__ == "__main__":
    main()
