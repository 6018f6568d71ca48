"""Does rounding pruned channel counts to multiples of 8 or 16 pay on this CPU? (the default ``round_to``)

    .venv/bin/python -m benchmarks.channel_alignment                      # resnet18, 10 classes, 3x32x32
    .venv/bin/python -m benchmarks.channel_alignment --size 224 --iterations 60

A random-weight torchvision resnet18 is pruned uniformly (``channel_prune``, no recovery: latency does not
depend on the weights' values) at each ratio, with channel counts unrounded and rounded to 8 and 16, and
realized with ONNX Runtime fp32 (after ``bn_fold``) and int8; every variant and the fp32 eager original are
then timed side by side (``measure_latency``: interleaved rounds, batch 1). ONNX Runtime's fp32 convolutions
work on blocks of channels (NCHWc: 8 on AVX2, 16 on AVX-512), so a width such as 205 costs like 208 and
more: its tail goes through slower code.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torchvision

import compression.techniques  # noqa: F401 - registers every technique
from benchmarks.common import table
from compression.context import CompressionContext
from compression.runtimes.eager import reference_predictor
from compression.runtimes.predictor import Predictor
from compression.runtimes.realization import RealizationConfig, build_predictor
from compression.search.latency import measure_latency
from compression.techniques.analysis import count_macs
from compression.techniques.registry import apply, config_from_dict

ROUNDINGS = (1, 8, 16)
EAGER = "fp32 eager"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.5])
    parser.add_argument("--iterations", type=int, default=300, help="interleaved timing rounds")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    calibration = torch.randn(64, 3, args.size, args.size)
    ctx = CompressionContext(calibration, calibration[:1], model, progress=lambda _: None)
    folder = Path(tempfile.mkdtemp(prefix="channel-alignment-"))
    predictors: dict[str, Predictor] = {EAGER: reference_predictor(model, ctx.device, tuple(calibration.shape[1:]), 1)}
    macs = {EAGER: count_macs(model, calibration[:1])}
    for ratio in [0.0, *args.ratios]:
        for rounding in ROUNDINGS if ratio else (1,):
            pruned = model
            if ratio:
                step = {"technique": "channel_prune", "ratio": ratio, "round_to": rounding}
                pruned = apply(model, config_from_dict({**step, "distillation": {"epochs": 0}}), ctx)
            folded = apply(pruned, config_from_dict({"technique": "bn_fold"}), ctx)
            for precision, source in (("fp32", folded), ("int8", pruned)):
                name = f"{ratio:g}|{rounding}|{precision}"
                realization = RealizationConfig.from_dict({"runtime": "onnxruntime", "precision": precision})
                predictors[name] = build_predictor(
                    source, realization, ctx, folder / name.replace("|", "-"), max_batch_size=1
                )
                macs[name] = count_macs(pruned, calibration[:1])
            print(f"built ratio {ratio:g}, round_to {rounding}", flush=True)
    stats = measure_latency(predictors, calibration[:1].contiguous(), warmup=20, iterations=args.iterations)
    eager = stats[EAGER].p50_ms
    rows = [[EAGER, "-", "-", f"{macs[EAGER] / 1e6:.0f}", f"{eager:.3f}", "1.00x"]]
    for name, result in stats.items():
        if name == EAGER:
            continue
        ratio, rounding, precision = name.split("|")
        rows.append(
            [
                f"ONNX Runtime {precision}",
                ratio,
                "none" if rounding == "1" else rounding,
                f"{macs[name] / 1e6:.0f}",
                f"{result.p50_ms:.3f}",
                f"{eager / result.p50_ms:.2f}x",
            ]
        )
    print(f"\nresnet18 (10 classes) at 3x{args.size}x{args.size}, batch 1, {args.iterations} interleaved rounds:\n")
    print(table(["variant", "ratio", "round_to", "MMACs", "p50 ms", "vs eager"], rows))


if __name__ == "__main__":
    main()
