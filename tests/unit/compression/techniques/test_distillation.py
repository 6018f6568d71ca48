"""The distillation loop's augmentations, early stopping and best-epoch restore, on tiny nets and tensors."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

import compression.techniques  # noqa: F401 - registers every technique
from compression.context import CompressionContext
from compression.techniques.distillation import DistillSettings, distill, logits_of
from compression.techniques.kd_augment import mix
from compression.techniques.registry import config_from_dict, config_to_dict

CLASSES = 5

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


class Teacher(nn.Module):
    """A linear map of the channel means: its top-1 varies over random inputs and a small CNN can learn it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)) * 16.0)


class Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


class Recording(nn.Module):
    """Wraps a model and keeps every input it is called on, with the mode it was in."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[bool, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, x.detach().clone()))
        return self.inner(x)


def _models(seed: int = 0) -> tuple[nn.Module, Student]:
    torch.manual_seed(seed)
    return Teacher().eval(), Student()


def _ctx(teacher: nn.Module, n: int, progress: Callable[[str], None], seed: int = 0) -> CompressionContext:
    calib = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return CompressionContext(calib, calib[:2], teacher, seed=seed, progress=progress)


# -- settings --------------------------------------------------------------------------------------


def test_new_fields_default_to_what_old_configs_meant() -> None:
    settings = DistillSettings()
    assert (settings.flip, settings.mixup, settings.cutmix) == (False, 0.0, 0.0)
    assert (settings.patience, settings.restore_best) == (0, False)
    assert not settings.augmentation.active
    assert DistillSettings(augment=True).augmentation.max_shift == 0.08
    assert DistillSettings(max_shift=0.2).augmentation.max_shift == 0.0  # NOTE: max_shift alone shifts nothing
    old = config_from_dict({"technique": "channel_prune", "distillation": {"epochs": 3, "augment": True}})
    assert old.distillation.epochs == 3 and old.distillation.patience == 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"flip": "yes"}, "flip must be a bool"),
        ({"flip": 1}, "flip must be a bool"),
        ({"restore_best": None}, "restore_best must be a bool"),
        ({"mixup": -0.2}, r"mixup must be a number in \[0, inf\]"),
        ({"mixup": True}, "mixup must be a number"),
        ({"cutmix": float("nan")}, "cutmix must be a number"),
        ({"cutmix": "1"}, "cutmix must be a number"),
        ({"patience": -1}, r"patience must be an integer in >= 0"),
        ({"patience": 1.5}, "patience must be an integer"),
        ({"loss": "l1"}, "loss must be one of kl, mse, got 'l1'"),
        ({"freeze_batchnorm": 1}, "freeze_batchnorm must be a bool"),
    ],
)
def test_bad_values_raise_with_the_field_named(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DistillSettings(**changes)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"channel_prune: distillation: {message}"):
        config_from_dict({"technique": "channel_prune", "distillation": changes})


def test_new_fields_round_trip_through_json() -> None:
    block = {"flip": True, "mixup": 0.3, "cutmix": 1.0, "patience": 0, "restore_best": False}
    config = config_from_dict({"technique": "student", "distillation": block})
    again = config_from_dict(json.loads(json.dumps(config_to_dict(config))))
    assert again == config and dataclasses.asdict(again.distillation).items() >= block.items()


def test_augmenting_needs_images() -> None:
    teacher = nn.Linear(4, CLASSES)
    ctx = CompressionContext(torch.randn(8, 4), torch.randn(2, 4), teacher)
    with pytest.raises(ValueError, match=r"augmentation .* needs images \(N, C, H, W\), got shape \(8, 4\)"):
        distill(nn.Linear(4, CLASSES), teacher, ctx.calibration_inputs, DistillSettings(flip=True), ctx)


# -- augmentations ---------------------------------------------------------------------------------


def _constant_images(n: int = 16) -> torch.Tensor:
    """Image i is filled with the value i, so a mixed image shows which images it came from."""
    return torch.arange(n, dtype=torch.float32).view(-1, 1, 1, 1).expand(n, 2, 6, 6).contiguous()


def test_mixup_blends_whole_images_and_cutmix_pastes_a_box_of_another() -> None:
    batch = _constant_images()
    gen = torch.Generator().manual_seed(0)
    blended = mix(batch, 1.0, 0.0, gen)
    assert all(img.unique().numel() == 1 for img in blended)  # a blend of two constants is a constant
    assert blended.min() >= 0 and blended.max() <= 15 and not torch.equal(blended, batch)
    cut = mix(batch, 0.0, 1.0, gen)
    values = set(batch.unique().tolist())
    assert all(img.unique().numel() <= 2 and set(img.unique().tolist()) <= values for img in cut)
    assert sum(img.unique().numel() == 2 for img in cut) >= 8  # most images got a box pasted in
    both = mix(batch, 1.0, 1.0, gen)
    kinds = [img.unique().numel() == 1 and float(img[0, 0, 0]) not in values for img in both]
    assert any(kinds) and not all(kinds)  # some blended, some cut


def test_teacher_labels_exactly_the_augmented_batch_the_student_trains_on() -> None:
    plain_teacher, plain_student = _models()
    teacher, student = Recording(plain_teacher), Recording(plain_student)
    ctx = _ctx(teacher, 48, lambda line: None)
    settings = DistillSettings(epochs=2, batch_size=8, augment=True, flip=True, mixup=0.4, cutmix=1.0, patience=0)
    distill(student, teacher, ctx.calibration_inputs, settings, ctx)
    trained = [x for training, x in student.calls if training]
    labelled = [x for _, x in teacher.calls[1:]]  # NOTE: the first call labels the holdout, once
    assert len(trained) == len(labelled) == 2 * 6
    assert all(torch.equal(a, b) for a, b in zip(trained, labelled))
    inputs = ctx.calibration_inputs
    assert not any((row == inputs).flatten(1).all(1).any() for batch in trained for row in batch)


def test_flip_alone_mirrors_about_half_the_images_exactly() -> None:
    teacher, plain_student = _models()
    student = Recording(plain_student)
    ctx = _ctx(teacher, 48, lambda line: None)
    distill(student, teacher, ctx.calibration_inputs, DistillSettings(epochs=1, batch_size=8, flip=True), ctx)
    inputs = ctx.calibration_inputs
    mirrored = plain = 0
    for row in (row for training, batch in student.calls if training for row in batch):
        is_plain = bool((row == inputs).flatten(1).all(1).any())
        is_mirrored = bool((row == inputs.flip(-1)).flatten(1).all(1).any())
        assert is_plain or is_mirrored
        plain, mirrored = plain + is_plain, mirrored + is_mirrored
    assert plain >= 10 and mirrored >= 10


# -- early stopping and restore --------------------------------------------------------------------


def _corrupted_run(settings: DistillSettings, good_epochs: int) -> tuple[nn.Module, list[str], list[dict]]:
    """Distill with every step after ``good_epochs`` epochs forcing the student to predict one class.

    Returns the student, the progress lines and the student's weights when each epoch was reported."""
    teacher, student = _models()
    lines: list[str] = []
    snapshots: list[dict[str, torch.Tensor]] = []

    def progress(line: str) -> None:
        lines.append(line)
        if line.startswith("distill epoch"):
            snapshots.append({k: v.clone() for k, v in student.state_dict().items()})

    ctx = _ctx(teacher, 160, progress)
    rarest = int(logits_of(teacher, ctx.calibration_inputs, ctx.device).argmax(1).bincount(minlength=CLASSES).argmin())
    steps_per_epoch = 9  # NOTE: 160 - 16 held out = 144 images in batches of 16
    steps = 0

    def before_step(model: nn.Module) -> None:
        nonlocal steps
        steps += 1
        if steps > good_epochs * steps_per_epoch:
            with torch.no_grad():
                student.head.weight.zero_()
                student.head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(rarest), CLASSES) * 100.0)

    distill(student, teacher, ctx.calibration_inputs, settings, ctx, before_step=before_step)
    return student, lines, snapshots


def test_patience_stops_and_the_best_epoch_is_restored() -> None:
    settings = DistillSettings(epochs=12, batch_size=16, lr=1e-2, patience=2, restore_best=True)
    student, lines, snapshots = _corrupted_run(settings, good_epochs=4)
    epochs = [line for line in lines if line.startswith("distill epoch")]
    assert len(epochs) <= 4 + 2 < 12
    assert "stopped early" in lines[-2] and "no holdout improvement in 2 epochs" in lines[-2]
    restored = re.fullmatch(r"distill restored epoch (\d+): agreement=.*\(last epoch (\d+): .*\)", lines[-1])
    assert restored is not None, lines[-1]
    best, last = int(restored[1]), int(restored[2])
    assert best <= 4 and last == len(epochs)
    for key, value in student.state_dict().items():
        assert torch.equal(value, snapshots[best - 1][key]), key
    agreements = [float(re.search(r"agreement=([\d.]+)%", line)[1]) for line in epochs]  # type: ignore[index]
    assert agreements[best - 1] == max(agreements) > agreements[-1]


def test_without_patience_every_epoch_runs_and_restore_is_separate() -> None:
    keep_last = DistillSettings(epochs=7, batch_size=16, lr=1e-2, patience=0, restore_best=False)
    student, lines, snapshots = _corrupted_run(keep_last, good_epochs=3)
    assert len(snapshots) == len(lines) == 7
    assert all(torch.equal(v, snapshots[-1][k]) for k, v in student.state_dict().items())
    student, lines, snapshots = _corrupted_run(dataclasses.replace(keep_last, restore_best=True), good_epochs=3)
    assert len(snapshots) == 7 and lines[-1].startswith("distill restored epoch")
    best = int(lines[-1].split()[3].rstrip(":"))
    assert best <= 3 and all(torch.equal(v, snapshots[best - 1][k]) for k, v in student.state_dict().items())


def test_every_part_on_is_deterministic_for_a_seed() -> None:
    settings = DistillSettings(
        epochs=3, batch_size=16, augment=True, flip=True, mixup=0.3, cutmix=1.0, patience=1, restore_best=True
    )

    def run(seed: int) -> dict[str, torch.Tensor]:
        teacher, student = _models()
        ctx = _ctx(teacher, 64, lambda line: None, seed=seed)
        return distill(student, teacher, ctx.calibration_inputs, settings, ctx).state_dict()

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


# -- loss and BatchNorm ----------------------------------------------------------------------------


def test_frozen_batchnorm_keeps_its_statistics_while_the_rest_trains() -> None:
    teacher, student = _models()
    bn = student.body[1]
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(2.0)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    ctx = _ctx(teacher, 64, lambda line: None)
    distill(
        student, teacher, ctx.calibration_inputs, DistillSettings(epochs=2, batch_size=16, freeze_batchnorm=True), ctx
    )
    after = student.state_dict()
    for key in ("body.1.running_mean", "body.1.running_var", "body.1.num_batches_tracked"):
        assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["body.0.weight"], before["body.0.weight"])
    assert not torch.equal(after["body.1.weight"], before["body.1.weight"])  # NOTE: its affine weights still train

    teacher, student = _models()
    distill(student, teacher, ctx.calibration_inputs, DistillSettings(epochs=2, batch_size=16), ctx)
    assert int(student.state_dict()["body.1.num_batches_tracked"]) > 0


def _logit_distance(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    return float(torch.nn.functional.mse_loss(logits_of(student, x, x.device), logits_of(teacher, x, x.device)))


def test_the_mse_loss_brings_the_logits_themselves_closer() -> None:
    """MSE matches logits, not softened probabilities: on the training images the logits' mean squared
    distance falls further than under the KL loss of the same run length."""

    def distance_after(loss: str) -> float:
        teacher, student = _models()
        ctx = _ctx(teacher, 128, lambda line: None)
        settings = DistillSettings(epochs=15, batch_size=16, lr=1e-2, loss=loss, holdout_fraction=0.1)
        distill(student, teacher, ctx.calibration_inputs, settings, ctx)
        return _logit_distance(student, teacher, ctx.calibration_inputs)

    teacher, student = _models()
    untrained = _logit_distance(student, teacher, _ctx(teacher, 128, lambda line: None).calibration_inputs)
    mse, kl = distance_after("mse"), distance_after("kl")
    assert mse < kl and mse < untrained / 2, (mse, kl, untrained)
