"""The development model: a trained resnet18 on which compression really costs accuracy (issue 14).

On the digits model of ``compression_fidelity`` every compressed variant keeps ~99% top-1, so it shows
nothing. This one is the same torchvision resnet18 (``num_classes=10``) trained by
``compression_fidelity.train`` with the ``HARD_DIGITS`` recipe on the hard digits of
``benchmarks.hard_digits`` (2,000 "train", 2,000 "val", 1,000 "test" 32x32 RGB images, stratified and
disjoint): fp32 top-1 is ~90% (20 epochs), so a lossy variant has accuracy to lose and the search has to show, on
2,000 validation images, that it does not lose too much. The weights are cached with the fidelity
benchmark's (``OUT/fidelity/resnet18-hard-digits32-<key>.pt``, the training figures next to them in a
``.json``)::

    .venv/bin/python -m benchmarks.development_model --out build/benchmarks/compression
    .venv/bin/python -m benchmarks.development_model --out build/benchmarks/compression --export build/hard-digits

``--architecture mobilenet_v3_small`` (``compression_fidelity.ARCHITECTURES``) trains and caches that
torchvision model with the same recipe instead (``OUT/fidelity/mobilenet_v3_small-hard-digits32-<key>.pt``);
its export's ``deploy.yaml`` names that architecture.

From code: ``development_model(out, progress).eval_data()`` is what ``run_search`` takes.

``--export DIR`` writes ``model.pt`` (the state_dict), ``data.pt`` and ``test.pt`` (the project's
``tensor_file`` format: a ``torch.save`` dict with ``images`` float32 (N, 3, 32, 32), preprocessed, and
``labels`` int64) and this ``deploy.yaml``, so that
``.venv/bin/slimserve compress --config DIR/deploy.yaml --out DIR/search`` runs the real search::

    models:
      - name: hard-digits
        source: {format: torchvision, architecture: resnet18, weights: model.pt, num_classes: 10}
        labels: ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
        preprocessing: {channels: 3, resize: 32, crop: 32, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}
        batching: {max_batch_size: 8}
        compression:
          target: {device: cpu, batch_size: 1}
          budget: {max_accuracy_drop: 1.0, objective: fastest}
          data: {source: tensor_file, path: data.pt, calibration_size: 2000, validation_size: 2000, seed: 0}
          search: {max_minutes: 10}

NOTE on ``tensor_file`` (``compression/search/data.py``): the file holds one pool of images, which the
search shuffles with ``data.seed`` and cuts itself: the first ``min(validation_size, N // 2)`` validate,
the next ``calibration_size`` calibrate; there is no way to name which image is which. A file holding
"train" and "val" would therefore validate on images the model was trained on. So ``data.pt`` holds
the 4,000 "train" and "val" images laid out such that exactly this cut (seed 0, 2,000 and 2,000) gives
"val" as the validation set and "train" as the calibration set; the export finds the layout by running
``load_eval_data`` on a probe file and checks the result by loading ``data.pt`` the same way. Another
seed or other sizes in the config mix the two. 2,000 + 2,000 fit: N // 2 = 2,000, and 2,000 calibration
images meet ``search.student_min_images``. "test" (``test.pt``) is for scoring afterwards, not for the
search.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.compression_fidelity import (
    ARCHITECTURES,
    HARD_DIGITS,
    Recipe,
    dataset_splits,
    model_path,
    recipe_for,
    top1,
    trained_model,
)
from benchmarks.hard_digits import MEAN, STD
from compression.models.settings import PreprocessingSettings
from compression.search.data import EvalData, load_eval_data
from compression.search.settings import DataSettings

DEPLOY_YAML = """\
models:
  - name: hard-digits
    source: {format: torchvision, architecture: resnet18, weights: model.pt, num_classes: 10}
    labels: ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
    preprocessing: {channels: 3, resize: 32, crop: 32, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}
    batching: {max_batch_size: 8}
    compression:
      target: {device: cpu, batch_size: 1}
      budget: {max_accuracy_drop: 1.0, objective: fastest}
      data: {source: tensor_file, path: data.pt, calibration_size: 2000, validation_size: 2000, seed: 0}
      search: {max_minutes: 10}
"""
"""What ``--export`` writes as ``deploy.yaml`` for resnet18 (the module docstring shows it; a unit test keeps
them equal); ``deploy_yaml`` names another architecture in it."""
DATA_SEED = 0
CALIBRATION_SIZE = VALIDATION_SIZE = 2000


@dataclass(frozen=True)
class DevelopmentModel:
    model: nn.Module
    """The trained model (``recipe.architecture``, resnet18 by default), eval mode, on the CPU."""
    calibration: torch.Tensor
    """float32 (2000, 3, 32, 32): the "train" images, preprocessed exactly as in training."""
    calibration_labels: np.ndarray
    """int64 (2000,): their digits (a search never uses them)."""
    validation: torch.Tensor
    """float32 (2000, 3, 32, 32): "val", never trained on."""
    validation_labels: np.ndarray
    """int64 (2000,)."""
    test: torch.Tensor
    """float32 (1000, 3, 32, 32): "test", for scoring after a search (neither training nor search saw it)."""
    test_labels: np.ndarray
    """int64 (1000,)."""
    weights: Path
    """The cached state_dict."""
    train_seconds: float | None
    """How long training took (when it ran, now or earlier: read from the ``.json`` next to the weights)."""
    recipe: Recipe = HARD_DIGITS

    def eval_data(self) -> EvalData:
        """What ``run_search`` takes: calibration on "train", validation on "val"."""
        return EvalData(self.calibration, self.validation, self.validation_labels)


def _quiet(message: str) -> None:
    pass


def development_model(
    out: Path, progress: Callable[[str], None] = _quiet, recipe: Recipe = HARD_DIGITS
) -> DevelopmentModel:
    """Train (once, cached under ``out / "fidelity"``) or load the development model, with its data."""
    folder = out / "fidelity"
    model, seconds = trained_model(folder, recipe, progress)
    splits = dataset_splits(recipe)
    weights = model_path(folder, recipe)
    figures = weights.with_suffix(".json")
    if seconds is not None:
        summary = {
            "recipe": dataclasses.asdict(recipe),
            "train_seconds": seconds,
            "val_top1": top1(model, *splits["val"]),
            "test_top1": top1(model, *splits["test"]),
        }
        figures.write_text(json.dumps(summary, indent=2) + "\n")
    elif figures.is_file():
        seconds = json.loads(figures.read_text()).get("train_seconds")
    return DevelopmentModel(
        model=model,
        calibration=splits["train"].images,
        calibration_labels=splits["train"].labels,
        validation=splits["val"].images,
        validation_labels=splits["val"].labels,
        test=splits["test"].images,
        test_labels=splits["test"].labels,
        weights=weights,
        train_seconds=seconds,
        recipe=recipe,
    )


def deploy_yaml(architecture: str) -> str:
    """``DEPLOY_YAML`` with ``architecture`` as the torchvision source's architecture."""
    old = "architecture: resnet18,"
    if DEPLOY_YAML.count(old) != 1:
        raise RuntimeError("DEPLOY_YAML no longer names exactly one resnet18 architecture")
    return DEPLOY_YAML.replace(old, f"architecture: {architecture},")


def _data_settings(path: Path) -> DataSettings:
    return DataSettings(
        source="tensor_file",
        path=path,
        calibration_size=CALIBRATION_SIZE,
        validation_size=VALIDATION_SIZE,
        seed=DATA_SEED,
    )


def _search_cut(path: Path) -> EvalData:
    """``path`` as the search reads it with the exported config's ``data`` block."""
    preprocessing = PreprocessingSettings(resize=32, crop=32, mean=MEAN, std=STD)
    content = torch.load(path, map_location="cpu", weights_only=True)
    return load_eval_data(_data_settings(path), preprocessing, tuple(content["images"].shape[1:]))


def export(dev: DevelopmentModel, folder: Path) -> None:
    """``model.pt``, ``data.pt`` (laid out for the search's own cut, see the module's NOTE), ``test.pt``
    and ``deploy.yaml`` in ``folder``; raises RuntimeError if the search would not cut "train"/"val"."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(dev.calibration) + len(dev.validation)
    probe = folder / "probe.pt"
    torch.save({"images": torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)}, probe)
    try:
        cut = _search_cut(probe)
    finally:
        probe.unlink()
    val_at, cal_at = cut.validation.flatten().long(), cut.calibration.flatten().long()
    _require(len(val_at) == len(dev.validation) and len(cal_at) == len(dev.calibration), "sizes do not fit the cut")
    images = torch.empty((n, *dev.validation.shape[1:]), dtype=torch.float32)
    labels = torch.empty(n, dtype=torch.int64)
    images[val_at], labels[val_at] = dev.validation, torch.from_numpy(dev.validation_labels)
    images[cal_at], labels[cal_at] = dev.calibration, torch.from_numpy(dev.calibration_labels)
    torch.save({"images": images, "labels": labels}, folder / "data.pt")
    torch.save({"images": dev.test, "labels": torch.from_numpy(dev.test_labels)}, folder / "test.pt")
    torch.save(dev.model.state_dict(), folder / "model.pt")
    (folder / "deploy.yaml").write_text(deploy_yaml(dev.recipe.architecture))

    check = _search_cut(folder / "data.pt")
    _require(torch.equal(check.validation, dev.validation), "data.pt: the search would not validate on val")
    _require(torch.equal(check.calibration, dev.calibration), "data.pt: the search would not calibrate on train")
    _require(
        check.validation_labels is not None and np.array_equal(check.validation_labels, dev.validation_labels),
        "data.pt: the search would not read the val labels",
    )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(message)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path("build/benchmarks/compression"))
    parser.add_argument("--export", type=Path, help="write model.pt, data.pt, test.pt and deploy.yaml here")
    parser.add_argument(
        "--architecture",
        choices=ARCHITECTURES,
        default=HARD_DIGITS.architecture,
        help="the torchvision model trained with the HARD_DIGITS recipe",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    recipe = recipe_for("hard-digits", args.architecture)
    dev = development_model(args.out, lambda message: print(message, flush=True), recipe)
    with torch.no_grad():
        val_top1, test_top1 = (
            top1(dev.model, dev.validation, dev.validation_labels),
            top1(dev.model, dev.test, dev.test_labels),
        )
    trained = "unknown" if dev.train_seconds is None else f"{dev.train_seconds:.0f} s"
    print(f"weights: {dev.weights}")
    print(
        f"fp32 top-1: val {val_top1:.2%} ({len(dev.validation)} images), test {test_top1:.2%} ({len(dev.test)} images)"
    )
    print(f"training time: {trained}; this run {time.perf_counter() - started:.0f} s")
    if args.export is not None:
        export(dev, args.export)
        from server.config.settings import load_config

        load_config(args.export / "deploy.yaml")  # raises with the reason if the written config is invalid
        print(f"exported to {args.export}: model.pt, data.pt, test.pt, deploy.yaml")


if __name__ == "__main__":
    main()
