"""Techniques on the trained digits model: accuracy on the held-out "test" split after compression.

Calibration and distillation use only "train" images; accuracy is measured on "test". Each test
prints its figures (run with ``-s`` to see them).
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import compression.techniques  # noqa: F401 - registers every technique
from compression.context import CompressionContext
from compression.models.digits.data import load_splits, normalize
from compression.models.digits.model import evaluate, load_trained
from compression.techniques.analysis import compressed_bytes, count_macs, count_params, sparsity
from compression.techniques.bn_folding import BnFoldConfig
from compression.techniques.clipping import WeightClipConfig
from compression.techniques.clustering import WeightClusterConfig
from compression.techniques.distillation import DistillSettings
from compression.techniques.registry import apply
from compression.techniques.structured_pruning import ChannelPruneConfig
from compression.techniques.student import StudentConfig
from compression.techniques.unstructured_pruning import MagnitudePruneConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_intra_op_thread")]


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    return load_trained()


@pytest.fixture(scope="module")
def teacher_accuracy(teacher: nn.Module) -> float:
    return evaluate(teacher, load_splits()["test"])


@pytest.fixture()
def ctx(teacher: nn.Module) -> CompressionContext:
    calibration = torch.from_numpy(normalize(load_splits()["train"].images))
    return CompressionContext(calibration_inputs=calibration, example_inputs=calibration[:8], teacher=teacher)


def _report(
    label: str, model: nn.Module, teacher: nn.Module, accuracy: float, teacher_accuracy: float, seconds: float
) -> None:
    x = torch.zeros(1, 1, 28, 28)
    print(
        f"\n{label}: test top-1 {accuracy:.3f} (original {teacher_accuracy:.3f}), "
        f"params {count_params(model)} / {count_params(teacher)}, "
        f"MACs {count_macs(model, x)} / {count_macs(teacher, x)}, "
        f"compressed {compressed_bytes(model)} / {compressed_bytes(teacher)} B, {seconds:.1f}s"
    )


def _run(model: nn.Module, config: object, ctx: CompressionContext) -> tuple[nn.Module, float, float]:
    started = time.perf_counter()
    result = apply(model, config, ctx)
    seconds = time.perf_counter() - started
    return result, evaluate(result, load_splits()["test"]), seconds


def test_half_the_channels_pruned_then_distilled_stays_within_one_point(
    teacher: nn.Module, teacher_accuracy: float, ctx: CompressionContext
) -> None:
    config = ChannelPruneConfig(ratio=0.5, distillation=DistillSettings(epochs=6, time_budget_s=90.0, lr=2e-3))
    pruned, accuracy, seconds = _run(teacher, config, ctx)
    _report("channel_prune 50% + KD", pruned, teacher, accuracy, teacher_accuracy, seconds)
    x = ctx.example_inputs
    assert count_macs(teacher, x) >= 2 * count_macs(pruned, x)
    assert accuracy >= teacher_accuracy - 0.01


def test_student_with_a_quarter_of_the_parameters_stays_within_two_points(
    teacher: nn.Module, teacher_accuracy: float, ctx: CompressionContext
) -> None:
    config = StudentConfig(
        architecture="depthwise_separable", distillation=DistillSettings(epochs=25, time_budget_s=90.0, lr=5e-3)
    )
    student, accuracy, seconds = _run(teacher, config, ctx)
    _report("depthwise-separable student", student, teacher, accuracy, teacher_accuracy, seconds)
    assert count_params(student) * 4 <= count_params(teacher)
    assert accuracy >= teacher_accuracy - 0.02


def test_eighty_percent_sparsity_shrinks_compressed_size(
    teacher: nn.Module, teacher_accuracy: float, ctx: CompressionContext
) -> None:
    config = MagnitudePruneConfig(sparsity=0.8, distillation=DistillSettings(epochs=3, time_budget_s=60.0, lr=1e-3))
    pruned, accuracy, seconds = _run(teacher, config, ctx)
    _report("magnitude_prune 80% + KD", pruned, teacher, accuracy, teacher_accuracy, seconds)
    assert sparsity(pruned) >= 0.8
    assert compressed_bytes(pruned) <= 0.5 * compressed_bytes(teacher)
    assert accuracy >= teacher_accuracy - 0.02


@pytest.mark.parametrize(
    "config",
    [BnFoldConfig(), WeightClusterConfig(bits=4), WeightClipConfig(percentile=99.9)],
    ids=lambda c: c.name,
)
def test_training_free_techniques_keep_accuracy(
    teacher: nn.Module, teacher_accuracy: float, ctx: CompressionContext, config: object
) -> None:
    result, accuracy, seconds = _run(teacher, config, ctx)
    _report(config.name, result, teacher, accuracy, teacher_accuracy, seconds)  # type: ignore[attr-defined]
    assert accuracy >= teacher_accuracy - 0.01
