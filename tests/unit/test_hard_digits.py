"""The hard-digits data of the development model: a stratified, disjoint, fixed split and a fixed hardening."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import numpy as np
import pytest

from benchmarks import development_model, hard_digits
from benchmarks.compression_fidelity import HARD_DIGITS, SEARCH_MINUTES, Recipe, model_path
from compression.models.digits.data import load_splits


def all_labels() -> np.ndarray:
    digits = load_splits()
    return np.concatenate([digits[name].labels for name in ("train", "val", "test")])


def test_the_split_is_stratified_disjoint_and_deterministic() -> None:
    labels = all_labels()
    split = hard_digits.stratified_split(labels, hard_digits.PER_CLASS, hard_digits.SPLIT_SEED)
    for name, per_class in hard_digits.PER_CLASS.items():
        assert np.bincount(labels[split[name]], minlength=10).tolist() == [per_class] * 10
    assert [len(split[name]) for name in ("train", "val", "test")] == [2000, 2000, 1000]
    together = np.concatenate(list(split.values()))
    assert len(np.unique(together)) == len(together) == 5000
    again = hard_digits.stratified_split(labels, hard_digits.PER_CLASS, hard_digits.SPLIT_SEED)
    assert all(np.array_equal(split[name], again[name]) for name in split)
    other = hard_digits.stratified_split(labels, hard_digits.PER_CLASS, hard_digits.SPLIT_SEED + 1)
    assert not np.array_equal(split["val"], other["val"])
    assert len(set(labels[split["train"][:20]])) > 3  # classes are mixed, not label-sorted


def test_the_split_refuses_a_class_with_too_few_images() -> None:
    with pytest.raises(ValueError, match="class 1 has only 2 images"):
        hard_digits.stratified_split(np.array([0, 0, 0, 1, 1]), {"a": 2, "b": 1}, 0)


def test_hardening_is_deterministic_and_changes_the_images() -> None:
    source = load_splits()["test"].images[:16]
    hard = hard_digits.harden(source, seed=3)
    assert hard.shape == (16, 32, 32, 3) and hard.dtype == np.uint8
    assert np.array_equal(hard, hard_digits.harden(source, seed=3))
    assert not np.array_equal(hard, hard_digits.harden(source, seed=4))
    # colour: the channels differ; and the image is far from the plain digit scaled to 32 px
    assert np.abs(hard[..., 0].astype(int) - hard[..., 1]).mean() > 5
    plain = np.pad(source, ((0, 0), (2, 2), (2, 2))).astype(int)
    assert np.abs(hard.astype(int) - plain[..., None]).mean() > 30
    x = hard_digits.preprocess(hard)
    assert tuple(x.shape) == (16, 3, 32, 32) and str(x.dtype) == "torch.float32"
    assert float(x[0, 1, 5, 7]) == pytest.approx((hard[0, 5, 7, 1] / 255 - 0.5) / 0.25, abs=1e-6)


def test_the_digits_recipe_keeps_its_cache_key() -> None:
    # NOTE: the key of the weights and search results cached before the dataset field existed.
    assert Recipe().key() == "034bc8e84b"
    assert HARD_DIGITS.key() != Recipe(dataset="hard-digits").key() != Recipe().key()
    with pytest.raises(ValueError, match="dataset must be one of"):
        Recipe(dataset="cifar")
    with pytest.raises(ValueError, match="redraw needs"):
        Recipe(redraw=True)


def test_another_architecture_gets_its_own_key_and_file_and_resnet18_keeps_its_own() -> None:
    # NOTE: the architecture field came after the first cached models: resnet18 keeps their keys and files.
    assert Recipe(architecture="resnet18").key() == Recipe().key() == "034bc8e84b"
    assert model_path(Path("f"), Recipe()) == Path("f/resnet18-digits32-034bc8e84b.pt")
    assert model_path(Path("f"), HARD_DIGITS) == Path(f"f/resnet18-hard-digits32-{HARD_DIGITS.key()}.pt")
    mobilenet = dataclasses.replace(HARD_DIGITS, architecture="mobilenet_v3_small")
    assert mobilenet.key() != HARD_DIGITS.key()
    assert model_path(Path("f"), mobilenet) == Path(f"f/mobilenet_v3_small-hard-digits32-{mobilenet.key()}.pt")
    with pytest.raises(ValueError, match="architecture must be one of"):
        Recipe(architecture="vgg11")


def test_the_exported_deploy_config_is_the_documented_one_and_valid(tmp_path: Path) -> None:
    from server.config.settings import load_config

    assert textwrap.indent(development_model.DEPLOY_YAML, "    ") in (development_model.__doc__ or "")
    (tmp_path / "deploy.yaml").write_text(development_model.DEPLOY_YAML)
    model = load_config(tmp_path / "deploy.yaml").models[0]
    assert model.compression is not None and model.compression.data.source == "tensor_file"
    assert model.compression.data.validation_size == development_model.VALIDATION_SIZE
    # NOTE: slimserve compress on the export runs the benchmark's search, time budget included
    assert model.compression.search.max_minutes == SEARCH_MINUTES
    (tmp_path / "deploy.yaml").write_text(development_model.deploy_yaml("mobilenet_v3_small"))
    source = load_config(tmp_path / "deploy.yaml").models[0].source
    assert getattr(source, "architecture", None) == "mobilenet_v3_small"
