"""Tests for the bundled digits data set and model (compression/models/digits)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from compression.models.digits import model as digits_model
from compression.models.digits.data import IMAGE_SIZE, LABELS, MEAN, STD, encode_png, load_splits, normalize
from compression.models.digits.model import DigitsNet, TrainConfig, ensure_trained, evaluate, load_trained, weights_path

# NOTE: a recipe that trains in a few seconds; used only where the training/caching code itself is tested.
TINY = TrainConfig(width=4, epochs=1, batch_size=1000)


def test_splits_sizes_dtypes_and_balance() -> None:
    splits = load_splits()
    assert set(splits) == {"train", "val", "test"}
    for name, size in {"train": 4000, "val": 500, "test": 500}.items():
        split = splits[name]
        assert split.images.shape == (size, IMAGE_SIZE, IMAGE_SIZE) and split.images.dtype == np.uint8
        assert split.labels.shape == (size,) and split.labels.dtype == np.int64
        assert np.array_equal(np.bincount(split.labels, minlength=10), np.full(10, size // 10))
        # white digit on black: the border is background, the centre holds ink
        assert split.images[:, 0, :].mean() < 5 and split.images.max() == 255


def test_splits_are_disjoint_and_cover_the_source() -> None:
    keys = {name: {img.tobytes() for img in split.images} for name, split in load_splits().items()}
    assert all(len(keys[n]) == len(load_splits()[n]) for n in keys)  # the 5,000 source images are unique
    assert not keys["train"] & keys["val"]
    assert not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]
    assert sum(len(k) for k in keys.values()) == 5000


def test_splits_are_deterministic_and_not_label_sorted() -> None:
    first = load_splits()
    load_splits.cache_clear()
    second = load_splits()
    assert first is not second
    for name in first:
        assert np.array_equal(first[name].images, second[name].images)
        assert np.array_equal(first[name].labels, second[name].labels)
        assert not first[name].images.flags.writeable
    assert len(set(first["test"].labels[:50].tolist())) >= 8  # shuffled, not sorted by label


def test_normalize_values_and_layout() -> None:
    images = np.zeros((3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    images[1] = 255
    images[2, 5, 7] = 51
    out = normalize(images)
    assert out.shape == (3, 1, IMAGE_SIZE, IMAGE_SIZE) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], -MEAN[0] / STD[0], rtol=1e-6)
    np.testing.assert_allclose(out[1], (1 - MEAN[0]) / STD[0], rtol=1e-6)
    np.testing.assert_allclose(out[2, 0, 5, 7], (51 / 255 - MEAN[0]) / STD[0], rtol=1e-6)
    train = normalize(load_splits()["train"].images)
    assert abs(float(train.mean())) < 0.05 and abs(float(train.std()) - 1) < 0.05
    with pytest.raises(ValueError):
        normalize(np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8))


def test_encode_png_round_trips() -> None:
    for image in load_splits()["test"].images[:20]:
        png = encode_png(image)
        assert png.startswith(b"\x89PNG")
        decoded = Image.open(io.BytesIO(png))
        assert decoded.mode == "L" and decoded.size == (IMAGE_SIZE, IMAGE_SIZE)
        assert np.array_equal(np.asarray(decoded), image)
    with pytest.raises(ValueError):
        encode_png(np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32))


def test_labels() -> None:
    assert LABELS == [str(d) for d in range(10)]


def test_digits_net_shape_and_standard_layers() -> None:
    net = DigitsNet().eval()
    assert net(torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE)).shape == (2, 10)
    assert DigitsNet(num_classes=3, width=8)(torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE)).shape == (1, 3)
    modules = list(net.modules())
    convs = [m for m in modules if isinstance(m, nn.Conv2d)]
    relus = [m for m in modules if isinstance(m, nn.ReLU)]
    bns = [m for m in modules if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(bns) == len(relus) >= 4  # one fresh ReLU module per use
    assert not any(r.inplace for r in relus)
    assert DigitsNet().state_dict().keys() == net.state_dict().keys()  # default width matches the recipe
    assert digits_model.DEFAULT_CONFIG.width == net.classifier.in_features // 4


def test_cache_key_tracks_recipe_and_version(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    base = weights_path(tmp_path, TINY)
    assert base.parent == tmp_path and base.name.startswith("digitsnet-") and base.suffix == ".pt"
    assert weights_path(tmp_path, TrainConfig(width=4, epochs=2, batch_size=1000)) != base
    monkeypatch.setattr(digits_model, "TRAINING_VERSION", digits_model.TRAINING_VERSION + 1)
    assert weights_path(tmp_path, TINY) != base


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SLIMSERVE_CACHE_DIR", str(tmp_path))
    assert digits_model.default_cache_dir() == tmp_path / "digits"
    monkeypatch.delenv("SLIMSERVE_CACHE_DIR")
    assert digits_model.default_cache_dir() == Path.home() / ".cache" / "slimserve" / "digits"


def test_ensure_trained_reuses_an_existing_file(tmp_path: Path) -> None:
    path = weights_path(tmp_path, TINY)
    torch.save(DigitsNet(width=TINY.width).state_dict(), path)
    os.utime(path, (1_000_000_000, 1_000_000_000))
    assert ensure_trained(tmp_path, TINY) == path
    assert path.stat().st_mtime == 1_000_000_000  # untouched: no training happened
    assert isinstance(load_trained(tmp_path, TINY), DigitsNet)


@pytest.mark.slow
def test_training_is_deterministic_atomic_and_side_effect_free(tmp_path: Path) -> None:
    threads, rng_state = torch.get_num_threads(), torch.get_rng_state()
    first = ensure_trained(tmp_path / "a", TINY)
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng_state)
    second = ensure_trained(tmp_path / "b", TINY)
    assert first.name == second.name
    a = torch.load(first, weights_only=True)
    b = torch.load(second, weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # no temp files left behind by the atomic write
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name, first.name + ".lock"]
    assert not load_trained(tmp_path / "a", TINY).training


@pytest.mark.slow
def test_trained_model_accuracy_and_fast_cache_hit() -> None:
    # NOTE: uses the default cache on purpose, so the real model is trained at most once per machine.
    path = ensure_trained()
    mtime = path.stat().st_mtime_ns
    model = load_trained()
    assert path.stat().st_mtime_ns == mtime  # a cache hit: nothing retrained
    assert not model.training
    splits = load_splits()
    assert evaluate(model, splits["test"]) >= 0.97
    assert evaluate(model, splits["val"]) >= 0.97
