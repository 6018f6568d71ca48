"""Calibration and validation images for a search: preprocessed tensors, disjoint by construction."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compression.models.images import ImagePreprocessor
from compression.models.settings import PreprocessingSettings
from compression.search.settings import DataSettings

log = logging.getLogger("slimserve.compression")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DataError(Exception):
    """The configured data cannot be used; the message says why."""


@dataclass(frozen=True)
class EvalData:
    calibration: torch.Tensor
    """(N, C, H, W) float32: int8 calibration and fine-tuning; labels never used."""
    validation: torch.Tensor
    """(M, C, H, W) float32, disjoint from ``calibration``: accuracy is measured here only."""
    validation_labels: np.ndarray | None
    """(M,) int64 class indices, or None (then fidelity is agreement with the original)."""


def load_eval_data(
    settings: DataSettings,
    preprocessing: PreprocessingSettings,
    input_shape: tuple[int, int, int],
    max_pixels: int = 40_000_000,
) -> EvalData:
    if settings.source == "builtin":
        data = _builtin_digits(settings)
    else:
        assert settings.path is not None
        if settings.source == "tensor_file":
            images, labels = _tensor_file(settings.path)
        else:
            images, labels = _image_folder(settings.path, ImagePreprocessor(preprocessing, max_pixels))
        data = _split(images, labels, settings)
    if tuple(data.validation.shape[1:]) != input_shape:
        raise DataError(
            f"data images have shape {list(data.validation.shape[1:])}, the model takes {list(input_shape)}"
        )
    log.info(
        "data: %d calibration and %d validation images (%s)",
        len(data.calibration),
        len(data.validation),
        "labelled" if data.validation_labels is not None else "unlabelled",
    )
    return data


def _builtin_digits(settings: DataSettings) -> EvalData:
    from compression.models.digits.data import load_splits, normalize

    splits = load_splits()
    train, val = splits["train"], splits["val"]
    return EvalData(
        torch.from_numpy(normalize(train.images[: settings.calibration_size])),
        torch.from_numpy(normalize(val.images[: settings.validation_size])),
        val.labels[: settings.validation_size].astype(np.int64),
    )


def _tensor_file(path: Path) -> tuple[torch.Tensor, np.ndarray | None]:
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the unpickler raises many types
        raise DataError(f"{path} cannot be read as a tensor file (weights_only=True): {exc}") from exc
    if not isinstance(content, dict) or not isinstance(content.get("images"), torch.Tensor):
        raise DataError(f"{path} must hold a dict with an 'images' tensor (N, C, H, W)")
    images = content["images"].float()
    labels = content.get("labels")
    if labels is not None and (not isinstance(labels, torch.Tensor) or len(labels) != len(images)):
        raise DataError(f"{path}: 'labels' must be a tensor with one label per image")
    return images, (labels.long().numpy() if labels is not None else None)


def _image_folder(root: Path, preprocess: ImagePreprocessor) -> tuple[torch.Tensor, np.ndarray]:
    """``root/<class>/<image>``; classes sorted by name give the label indices."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"image folder {root} has no class sub-folders")
    images: list[np.ndarray] = []
    labels: list[int] = []
    for index, folder in enumerate(classes):
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images.append(preprocess(path.read_bytes(), len(images)))
                labels.append(index)
    if not images:
        raise DataError(f"image folder {root} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    return torch.from_numpy(np.stack(images)), np.asarray(labels, dtype=np.int64)


def _split(images: torch.Tensor, labels: np.ndarray | None, settings: DataSettings) -> EvalData:
    """Shuffle with the seed; the first images validate, the rest calibrate (never overlapping)."""
    n = len(images)
    validation_size = min(settings.validation_size, n // 2)
    if validation_size < 20:
        raise DataError(f"{n} images are too few: need at least 40 (20 to validate, the rest to calibrate)")
    order = np.random.default_rng(settings.seed).permutation(n)
    val_idx = order[:validation_size]
    cal_idx = order[validation_size : validation_size + settings.calibration_size]
    return EvalData(
        images[torch.from_numpy(cal_idx)],
        images[torch.from_numpy(val_idx)],
        labels[val_idx] if labels is not None else None,
    )
