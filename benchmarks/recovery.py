"""What each part of knowledge-distillation recovery wins back after channel pruning (issue 14, item 2).

    .venv/bin/python -m benchmarks.recovery                                  # digits resnet18, ratio 0.5, 120 s a row
    .venv/bin/python -m benchmarks.recovery --model dev --ratio 0.6 --seeds 0 1 2
    .venv/bin/python -m benchmarks.recovery --model digitsnet --rows none plain --time-budget 5   # smoke run

Every row prunes the same model at ``--ratio`` through the registry (``channel_prune`` with a
``distillation`` block, on a ``CompressionContext`` holding the calibration images), so the rows share
the pruning and differ only in recovery, all under the same ``time_budget_s``. ``plain`` is KD with
``channel_prune``'s own learning rate and epochs and every new part off; each ``+part`` row adds one part
to it (``+lr-3e-4``, ``+lr-1e-4``: another learning rate); ``all`` has every part but those; ``default``
(on request) is the block a search runs today. Scored on the validation images: agreement with the
original's top-1, and the top-1 drop with its paired 95% interval.

Models (``--model``): ``resnet18`` (default), the digits-trained torchvision resnet18 of
``benchmarks.compression_fidelity``, loaded from its cache (run ``python -m benchmarks.compression`` first;
it is not trained here); ``dev``, ``benchmarks.development_model``'s harder model; ``digitsnet``, the
bundled digits CNN (cached under ``$SLIMSERVE_CACHE_DIR``), small enough for a smoke run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

import compression.techniques  # noqa: F401 - registers every technique
from benchmarks.common import table
from benchmarks.compression_common import print_progress
from compression.context import CompressionContext
from compression.search.accuracy import fidelity, predict_top1
from compression.search.runner import training_threads
from compression.techniques.registry import apply, config_from_dict
from compression.techniques.structured_pruning import CHANNEL_PRUNE_DISTILLATION

FILL_EPOCHS = 1000
"""An epoch cap no run reaches in its budget: the time budget binds and the learning rate anneals over it."""
PLAIN: dict[str, Any] = {
    "augment": False,
    "flip": False,
    "mixup": 0.0,
    "cutmix": 0.0,
    "patience": 0,
    "restore_best": False,
}
PARTS: dict[str, dict[str, Any]] = {
    "shift": {"augment": True},
    "flip": {"flip": True},
    "mixup": {"mixup": 0.3},
    "cutmix": {"cutmix": 1.0},
    "early-stop": {"patience": 3, "restore_best": True},
    "fill-budget": {"epochs": FILL_EPOCHS},
}
"""Each part of recovery as the distillation fields that turn it on, over ``PLAIN``."""
LEARNING_RATES: dict[str, dict[str, Any]] = {"lr-3e-4": {"lr": 3e-4}, "lr-1e-4": {"lr": 1e-4}}
"""Alternatives to ``channel_prune``'s own learning rate, each its own row (not parts of ``all``)."""
ROWS = ("none", "plain", *(f"+{part}" for part in {**PARTS, **LEARNING_RATES}), "all")
"""The rows run unless ``--rows`` names others; ``default`` (the block a search runs today) is on request."""


class Data(NamedTuple):
    model: nn.Module
    calibration: torch.Tensor
    validation: torch.Tensor
    validation_labels: np.ndarray | None


def distillation_block(row: str, budget_s: float) -> dict[str, Any] | None:
    """The ``distillation`` block of ``row`` (None: ``channel_prune``'s default block, budget aside)."""
    if row == "none":
        return {"epochs": 0}
    if row == "default":
        return {"time_budget_s": budget_s}
    block = {**PLAIN, "time_budget_s": budget_s}
    if row == "all":
        for part in PARTS.values():
            block.update(part)
    elif row != "plain":
        block.update({**PARTS, **LEARNING_RATES}[row.removeprefix("+")])
    return block


def _resnet18(cache: Path, calibration: int) -> Data:
    from benchmarks.compression_fidelity import Recipe, preprocess, trained_model
    from compression.models.digits.data import load_splits

    recipe = Recipe()
    folder = cache / "fidelity"
    # NOTE: trained_model's file name; checked first because trained_model would train a missing model.
    path = folder / f"resnet18-digits{recipe.image_size}-{recipe.key()}.pt"
    if not path.is_file():
        raise SystemExit(f"{path} not found: run `python -m benchmarks.compression` once to train and cache it")
    model, _ = trained_model(folder, recipe, print_progress)
    splits = load_splits()
    return Data(
        model,
        preprocess(splits["train"].images[:calibration], recipe.image_size),
        preprocess(splits["val"].images, recipe.image_size),
        splits["val"].labels.astype(np.int64),
    )


def _dev(cache: Path, calibration: int) -> Data:
    try:
        from benchmarks.development_model import development_model
    except ImportError as exc:
        raise SystemExit(f"--model dev needs benchmarks/development_model.py: {exc}") from exc
    dev = development_model(cache, print_progress)
    labels = None if dev.validation_labels is None else np.asarray(dev.validation_labels, dtype=np.int64)
    return Data(dev.model.eval(), dev.calibration[:calibration], dev.validation, labels)


def _digitsnet(cache: Path, calibration: int) -> Data:
    from compression.models.digits import load_splits, load_trained, normalize, weights_path

    if not weights_path().is_file():
        raise SystemExit(f"{weights_path()} not found: run `python -m compression.models.digits.model` first")
    splits = load_splits()
    return Data(
        load_trained(),
        torch.from_numpy(normalize(splits["train"].images[:calibration])),
        torch.from_numpy(normalize(splits["val"].images)),
        splits["val"].labels.astype(np.int64),
    )


MODELS = {"resnet18": _resnet18, "dev": _dev, "digitsnet": _digitsnet}


def run_row(data: Data, row: str, ratio: float, budget_s: float, seed: int, reference: np.ndarray) -> dict[str, Any]:
    """Prune and recover once; the figures of one seed of one row."""
    block = distillation_block(row, budget_s)
    config = config_from_dict({"technique": "channel_prune", "ratio": ratio, "distillation": block})
    lines: list[str] = []

    def progress(line: str) -> None:
        lines.append(line)
        print_progress(f"[{row} seed {seed}] {line}")

    ctx = CompressionContext(data.calibration, data.calibration[:8], data.model, seed=seed, progress=progress)
    started = time.perf_counter()
    pruned = apply(data.model, config, ctx)
    seconds = time.perf_counter() - started
    measured = fidelity(predict_top1(pruned.eval(), data.validation, 256), reference, data.validation_labels)
    restored = next((line.split()[3].rstrip(":") for line in lines if line.startswith("distill restored")), None)
    return {
        "row": row,
        "seed": seed,
        "distillation": dataclasses.asdict(config.distillation),
        "agreement": measured.agreement,
        "top1": measured.top1,
        "top1_drop": measured.top1_drop,
        "top1_drop_ci95": measured.top1_drop_ci95,
        "epochs_run": sum(line.startswith("distill epoch") for line in lines),
        "restored_epoch": int(restored) if restored else None,
        "stopped_early": any("stopped early" in line for line in lines),
        "seconds": seconds,
    }


def summary(results: list[dict[str, Any]], rows: list[str]) -> str:
    """One Markdown line per row: means over the seeds (and the seeds' range where there are several)."""

    def spread(values: list[float], fmt: str) -> str:
        text = format(statistics.fmean(values), fmt)
        return text if len(values) == 1 else f"{text} ({format(min(values), fmt)}-{format(max(values), fmt)})"

    body = []
    plain = [r["agreement"] for r in results if r["row"] == "plain"]
    for row in rows:
        runs = [r for r in results if r["row"] == row]
        agreement = [r["agreement"] * 100 for r in runs]
        drops = [r["top1_drop"] for r in runs if r["top1_drop"] is not None]
        ci = runs[0]["top1_drop_ci95"] if len(runs) == 1 else None
        gain = f"{(statistics.fmean(agreement) - statistics.fmean(plain) * 100):+.2f}" if plain else "-"
        restored = [str(r["restored_epoch"]) for r in runs if r["restored_epoch"]]
        body.append(
            [
                row,
                spread(agreement, ".2f"),
                gain,
                (spread(drops, "+.2f") + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")) if drops else "-",
                spread([float(r["epochs_run"]) for r in runs], ".1f"),
                ", ".join(restored) or "-",
                spread([r["seconds"] for r in runs], ".1f"),
            ]
        )
    headers = ["recovery", "agreement %", "vs plain", "top-1 drop pts [95% CI]", "epochs", "restored", "seconds"]
    return table(headers, body)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet18")
    parser.add_argument("--ratio", type=float, default=0.5, help="channel_prune ratio")
    parser.add_argument("--time-budget", type=float, default=CHANNEL_PRUNE_DISTILLATION.time_budget_s, help="s a row")
    parser.add_argument("--rows", nargs="+", choices=[*ROWS, "default"], default=list(ROWS), help="recoveries")
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="CompressionContext seeds; each row runs each"
    )
    parser.add_argument("--calibration", type=int, default=2000, help="at most this many calibration images")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (the search trains on 1)")
    parser.add_argument("--cache", type=Path, default=Path("build/benchmarks/compression"), help="model cache root")
    parser.add_argument("--out", type=Path, default=Path("build/benchmarks/recovery"))
    args = parser.parse_args(argv)

    data = MODELS[args.model](args.cache, args.calibration)
    reference = predict_top1(data.model.eval(), data.validation, 256)
    print_progress(
        f"{args.model}: {len(data.calibration)} calibration, {len(data.validation)} validation images; "
        f"ratio {args.ratio}, {args.time_budget:g} s a row, seeds {args.seeds}"
    )
    results = []
    with training_threads(args.threads):
        for row in args.rows:
            for seed in args.seeds:
                results.append(run_row(data, row, args.ratio, args.time_budget, seed, reference))
    heading = (
        f"## KD recovery after channel_prune ratio {args.ratio} on {args.model} "
        f"({len(data.calibration)} calibration images, {args.time_budget:g} s budget, seeds {args.seeds})"
    )
    report = f"{heading}\n\n{summary(results, args.rows)}\n"
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"recovery-{args.model}-r{args.ratio:g}-b{args.time_budget:g}"
    (args.out / f"{stem}.md").write_text(report)
    (args.out / f"{stem}.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2, default=str))
    print_progress(f"written to {args.out / stem}.md and .json")


if __name__ == "__main__":
    main()
