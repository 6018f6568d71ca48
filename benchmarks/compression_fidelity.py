"""Fidelity part of ``benchmarks.compression``: a trained torchvision model and the real search on it.

Top-1 agreement of random-weight nets on random inputs says nothing, so a torchvision resnet18
(``num_classes=10``, unchanged otherwise) is trained on the digits "train" split (4,000 MNIST images,
resized to 32x32, gray replicated to 3 channels) and cached. ``compression.search.runner.run_search`` then
runs with the default CPU candidates, a 1-point top-1 budget and objective "fastest", validating on
"val"; every variant it built is finally scored on "test", which neither training nor the search saw.

``Recipe(dataset="hard-digits")`` (``HARD_DIGITS``) trains the same resnet18 on the hard digits of
``benchmarks.hard_digits`` instead (2,000 "train", 2,000 "val", 1,000 "test" 32x32 RGB images), on which
fp32 top-1 is well below 95%, so a compressed variant has accuracy to lose.

``Recipe.architecture`` picks another torchvision classifier of ``ARCHITECTURES`` in resnet18's place
(e.g. ``dataclasses.replace(HARD_DIGITS, architecture="mobilenet_v3_small")``, a depthwise network),
trained the same way; its weights and search results are cached under their own key and file name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from benchmarks import hard_digits
from compression.models.digits.data import load_splits, normalize
from compression.runtimes.predictor import Predictor
from compression.search.accuracy import fidelity, predict_top1
from compression.search.data import EvalData
from compression.search.report import REPORT_JSON, write_reports
from compression.search.runner import SearchReport, run_search, training_threads
from compression.search.settings import BudgetSettings, CompressionSettings, SearchSettings, TargetSettings

TRAINING_VERSION = 1
MAX_BATCH = 8
GPU_BATCH = 64
CALIBRATION_IMAGES = 2000
"""First images of "train" given to the search as calibration (int8 ranges, KD recovery, students)."""
RESULTS = "benchmark.json"
DATASETS = ("digits", "hard-digits")
ARCHITECTURES = ("resnet18", "mobilenet_v3_small")
"""torchvision classifiers a recipe can train (``torchvision.models.<name>(weights=None, num_classes=10)``)."""
_LATER_FIELDS: dict[str, Any] = {"dataset": "digits", "redraw": False, "architecture": "resnet18"}
"""Recipe fields added after the first cached models, with their defaults."""


@dataclass(frozen=True)
class Recipe:
    image_size: int = 32
    epochs: int = 5
    batch_size: int = 128
    max_lr: float = 4e-3
    weight_decay: float = 5e-4
    label_smoothing: float = 0.05
    max_shift_px: int = 2
    seed: int = 0
    dataset: str = "digits"
    """``digits``: 4,000/500/500 MNIST images, gray. ``hard-digits``: 2,000/2,000/1,000, see hard_digits.py."""
    redraw: bool = False
    """hard-digits only: every epoch after the first trains on a new random draw of the training digits."""
    architecture: str = "resnet18"
    """The torchvision model trained, one of ``ARCHITECTURES``."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, not {self.architecture!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, not {self.dataset!r}")
        if self.redraw and self.dataset != "hard-digits":
            raise ValueError("redraw needs dataset hard-digits")
        if self.dataset == "hard-digits" and self.image_size != hard_digits.IMAGE_SIZE:
            raise ValueError(f"hard-digits images are {hard_digits.IMAGE_SIZE} px, not {self.image_size}")

    def key(self) -> str:
        # NOTE: fields added later stay out of the payload at their defaults, so older recipes keep their keys.
        fields = {k: v for k, v in dataclasses.asdict(self).items() if _LATER_FIELDS.get(k, object()) != v}
        payload = json.dumps({"version": TRAINING_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:10]


HARD_DIGITS = Recipe(dataset="hard-digits", epochs=20, batch_size=32, max_lr=2e-3, max_shift_px=0, redraw=True)
"""The hard-digits teacher: 2,000 digits (a new draw of their nuisances every epoch), 20 epochs; measured
(2026-12, 2-core box, one thread): 470 s, val top-1 89.6%, test 89.4% (8 epochs gave 84.5% / 83.9%: a
teacher unsure of more images, on which every pruned model lost 6-8% agreement)."""


RECIPES = {"digits": Recipe(), "hard-digits": HARD_DIGITS}
"""The recipe ``benchmarks.compression --dataset NAME`` trains and searches on."""
SPLIT_SIZES = {"digits": (4000, 500, 500), "hard-digits": (2000, 2000, 1000)}
"""Images in "train", "val" and "test" of each dataset (for the reports' text)."""


def recipe_for(dataset: str, architecture: str = "resnet18") -> Recipe:
    """``RECIPES[dataset]`` training ``architecture`` (``benchmarks.compression --dataset --architecture``)."""
    return dataclasses.replace(RECIPES[dataset], architecture=architecture)


def architecture_of(recipe: dict[str, Any]) -> str:
    """The architecture of a result's recipe (results cached before architectures existed are resnet18)."""
    return str(recipe.get("architecture", "resnet18"))


def split_sizes(recipe: dict[str, Any]) -> tuple[int, int, int]:
    """``SPLIT_SIZES`` of a result's recipe (results cached before datasets existed are digits)."""
    return SPLIT_SIZES[recipe.get("dataset", "digits")]


class LabelledImages(NamedTuple):
    images: torch.Tensor
    """float32 (N, 3, size, size), preprocessed as the model is fed."""
    labels: np.ndarray
    """int64 (N,)."""


def dataset_splits(recipe: Recipe) -> dict[str, LabelledImages]:
    """The "train", "val" and "test" splits of the recipe's dataset, preprocessed as for training."""
    if recipe.dataset == "hard-digits":
        return {
            name: LabelledImages(hard_digits.preprocess(split.images), split.labels.astype(np.int64))
            for name, split in hard_digits.load_hard_splits().items()
        }
    return {
        name: LabelledImages(preprocess(split.images, recipe.image_size), split.labels.astype(np.int64))
        for name, split in load_splits().items()
    }


@dataclass
class FidelityResult:
    recipe: dict[str, Any]
    train_seconds: float | None
    val_top1: float
    test_top1: float
    report: SearchReport
    test: dict[str, dict[str, Any]]
    """Variant name -> top1, top1_drop, top1_drop_ci95, agreement on "test" (or error)."""
    calibration_images: int = CALIBRATION_IMAGES


def preprocess(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 3, size, size), normalized as the digits model is."""
    x = torch.from_numpy(normalize(images))
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous()


def _shift(x: torch.Tensor, max_px: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``max_px`` pixels per image, filled with the background value."""
    if max_px == 0:
        return x
    background = float(x.amin())
    padded = F.pad(x, (max_px,) * 4, value=background)
    offsets = torch.randint(0, 2 * max_px + 1, (len(x), 2), generator=gen).tolist()
    size = x.shape[-1]
    return torch.stack([padded[i, :, dy : dy + size, dx : dx + size] for i, (dy, dx) in enumerate(offsets)])


def top1(model: nn.Module, x: torch.Tensor, y: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` (set to eval mode) on images ``x`` with labels ``y``."""
    return float((predict_top1(model.eval(), x, 250) == y).mean())


def build_model(recipe: Recipe) -> nn.Module:
    """The recipe's torchvision architecture, untrained, with 10 classes."""
    model: nn.Module = getattr(torchvision.models, recipe.architecture)(weights=None, num_classes=10)
    return model


def train(recipe: Recipe, progress: Callable[[str], None]) -> nn.Module:
    splits = dataset_splits(recipe)
    x, y = splits["train"].images, torch.from_numpy(splits["train"].labels.copy())
    val_x, val_y = splits["val"]
    with training_threads(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        gen = torch.Generator().manual_seed(recipe.seed)
        model = build_model(recipe)
        steps = math.ceil(len(y) / recipe.batch_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.max_lr, weight_decay=recipe.weight_decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=recipe.max_lr, epochs=recipe.epochs, steps_per_epoch=steps
        )
        loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
        started = time.perf_counter()
        for epoch in range(1, recipe.epochs + 1):
            model.train()
            if recipe.redraw and epoch > 1:
                x = hard_digits.preprocess(hard_digits.redrawn_train(epoch - 1))
            order = torch.randperm(len(y), generator=gen)
            for start in range(0, len(y), recipe.batch_size):
                idx = order[start : start + recipe.batch_size]
                loss = loss_fn(model(_shift(x[idx], recipe.max_shift_px, gen)), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
            progress(
                f"train epoch {epoch}/{recipe.epochs}: loss {float(loss.detach()):.3f}, "
                f"val top-1 {top1(model, val_x, val_y):.2%}, {time.perf_counter() - started:.0f} s"
            )
    return model.eval()


def model_path(folder: Path, recipe: Recipe) -> Path:
    """Where ``trained_model`` caches the recipe's weights (a state_dict)."""
    return folder / f"{recipe.architecture}-{recipe.dataset}{recipe.image_size}-{recipe.key()}.pt"


def trained_model(folder: Path, recipe: Recipe, progress: Callable[[str], None]) -> tuple[nn.Module, float | None]:
    """The recipe's trained model (cached in ``folder``) and its training seconds (None if it came from the cache)."""
    path = model_path(folder, recipe)
    if path.is_file():
        model = build_model(recipe)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        progress(f"trained model loaded from {path}")
        return model.eval(), None
    progress(f"training {recipe.architecture} on {recipe.image_size}x{recipe.image_size} {recipe.dataset} into {path}")
    started = time.perf_counter()
    model = train(recipe, progress)
    seconds = round(time.perf_counter() - started, 1)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model, seconds


def _load_cached(folder: Path) -> FidelityResult | None:
    try:
        data = json.loads((folder / RESULTS).read_text())
        data["report"] = SearchReport.from_json((folder / REPORT_JSON).read_text())
        return FidelityResult(**data)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _search_dir(out: Path, recipe: Recipe, device: str) -> Path:
    suffix = "" if device == "cpu" else f"-{device.replace(':', '')}"
    return out / "fidelity" / f"search-{recipe.key()}{suffix}"


SEARCH_MINUTES = 10.0
"""The CPU search's wall-clock budget (``search.max_minutes``): issue 14 asks for the whole search in 10
minutes on the 2 cores; the anytime search does not start a candidate or ratio that would not finish."""


def search_settings(device: str) -> CompressionSettings:
    """CPU: a 1-point top-1 budget at batch 1, in ``SEARCH_MINUTES``. GPU: also >= 99% agreement, at batch 64
    (GPU serving batches)."""
    if device == "cpu":
        return CompressionSettings(
            target=TargetSettings(device="cpu", batch_size=1),
            budget=BudgetSettings(max_accuracy_drop=1.0, objective="fastest"),
            search=SearchSettings(max_minutes=SEARCH_MINUTES),
        )
    return CompressionSettings(
        target=TargetSettings(device=device, batch_size=GPU_BATCH),
        budget=BudgetSettings(max_accuracy_drop=1.0, min_agreement=0.99, objective="fastest"),
    )


def cached_fidelity(out: Path, recipe: Recipe = Recipe(), device: str = "cpu") -> FidelityResult | None:
    return _load_cached(_search_dir(out, recipe, device))


def run_fidelity(
    out: Path,
    *,
    progress: Callable[[str], None],
    fresh_search: bool = False,
    recipe: Recipe = Recipe(),
    device: str = "cpu",
) -> FidelityResult:
    folder = out / "fidelity"
    search_dir = _search_dir(out, recipe, device)
    model, train_seconds = trained_model(folder, recipe, progress)
    if not fresh_search and train_seconds is None and (cached := _load_cached(search_dir)) is not None:
        progress(f"search results reused from {search_dir} (--fresh-search to redo)")
        return cached
    splits = dataset_splits(recipe)
    train_x = splits["train"].images
    (val_x, val_y), (test_x, test_y) = splits["val"], splits["test"]
    data = EvalData(calibration=train_x[:CALIBRATION_IMAGES], validation=val_x, validation_labels=val_y)
    settings = search_settings(device)
    shutil.rmtree(search_dir, ignore_errors=True)
    # NOTE: run_search deletes the artifacts of the variants it does not choose and returns only figures;
    # the predictors it measured are already loaded in memory (ONNX Runtime sessions, loaded AOTInductor
    # libraries, exported programs), so keeping them scores on "test" exactly what the search measured.
    predictors: dict[str, Predictor] = {}
    report = run_search(
        model,
        settings,
        data,
        search_dir,
        model_name=f"{recipe.architecture}-{recipe.dataset}",
        max_batch_size=MAX_BATCH,
        progress=progress,
        on_candidate_built=predictors.__setitem__,
    )
    write_reports(report, search_dir)
    progress(f"scoring {len(predictors)} built variants on the {len(test_y)} test images")
    reference = predict_top1(model, test_x, MAX_BATCH)
    test: dict[str, dict[str, Any]] = {}
    for name, predictor in predictors.items():
        try:
            measured = fidelity(predict_top1(predictor, test_x, MAX_BATCH), reference, test_y)
            test[name] = {
                "top1": measured.top1,
                "top1_drop": measured.top1_drop,
                "top1_drop_ci95": measured.top1_drop_ci95,
                "agreement": measured.agreement,
            }
        except Exception as exc:  # noqa: BLE001 - report, do not crash
            test[name] = {"error": f"{type(exc).__name__}: {exc}"}
    result = FidelityResult(
        recipe=dataclasses.asdict(recipe),
        train_seconds=train_seconds,
        val_top1=top1(model, val_x, val_y),
        test_top1=top1(model, test_x, test_y),
        report=report,
        test=test,
    )
    payload = {k: v for k, v in dataclasses.asdict(result).items() if k != "report"}
    (search_dir / RESULTS).write_text(json.dumps(payload, indent=2, default=str))
    return result
