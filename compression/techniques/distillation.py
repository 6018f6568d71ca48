"""Knowledge distillation (Hinton et al. 2015): the training loop shared by pruning recovery and students.

The loss is ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, argmax teacher)``,
so unlabeled images suffice: the teacher provides both the soft and the hard targets (``loss="mse"``
matches the teacher's logits instead). Training is bounded by ``epochs`` and ``time_budget_s``
(whichever comes first) and the learning rate follows a cosine decay over whichever of the two bounds
is closer, so a run cut short by time still ends at a small learning rate. The clock enters the
schedule only once the steps planned would not fit in the budget: a run that fits depends on its seed
alone, not on how busy the machine was. To train for the whole budget, set ``epochs`` above what fits:
the budget then binds and the rate anneals over it.

With augmentation (shifts, flips, mixup, CutMix: ``kd_augment.py``) the teacher labels each batch as the
student sees it. After every epoch the student is scored on a holdout of the inputs (agreement with the
teacher's top-1, ties broken by the KD loss there); ``patience`` stops a run that no longer improves and
``restore_best`` ends on the best epoch's weights rather than the last.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from compression.context import CompressionContext
from compression.errors import check_float, check_int
from compression.techniques.kd_augment import Augmentation, augment

_EVAL_BATCH = 256
LOSSES = ("kl", "mse")


@dataclass(frozen=True)
class DistillSettings:
    """How to distill: the ``distillation`` block of every technique that trains (channel and magnitude
    pruning's recovery fine-tuning, students), and what :func:`distill` runs.

    Each such technique gives the block its own defaults (``CHANNEL_PRUNE_DISTILLATION`` and the like in
    its module); a block written in a deploy config overrides only the fields it names.
    """

    epochs: int = 10
    """At most this many passes over the calibration inputs (0: no training)."""
    time_budget_s: float = 60.0
    """Training stops here even if epochs remain; the learning rate anneals over whichever bound is closer."""
    temperature: float = 4.0
    alpha: float = 0.9
    """Weight of the soft (KL) term; ``1 - alpha`` weighs cross-entropy against the teacher's argmax."""
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    augment: bool = False
    """Random translations of up to ``max_shift`` of the image size, drawn per image. Any augmentation
    costs a teacher forward per batch instead of teacher logits computed once."""
    max_shift: float = 0.08
    flip: bool = False
    """Mirror each image left-right with probability 1/2. Valid even where mirroring changes the class
    (digits): the teacher labels the mirrored image."""
    mixup: float = 0.0
    """Blend each image with another of its batch, the weight drawn from Beta(mixup, mixup) (0: off); the
    teacher labels the blend. Small values (0.2-0.4) keep most blends close to one of the two images."""
    cutmix: float = 0.0
    """Paste a box of another image of the batch, covering a share drawn from Beta(cutmix, cutmix) (0: off).
    With ``mixup`` as well, each image gets one of the two at random."""
    holdout_fraction: float = 0.1
    """Share of the inputs held back (never trained on) to measure agreement with the teacher."""
    patience: int = 0
    """Stop after this many epochs in which neither the holdout agreement nor the holdout KD loss
    improved (0: never stop early).

    NOTE: off by default, like ``restore_best``, because it did not pay where measured: on the hard-digits
    development model (channel_prune 0.3, 60 s) early stopping with restore kept 90.65% agreement on 2,000
    validation images against 92.00% without (the holdout is 10% of the calibration images, too few to pick
    an epoch by); docs/benchmarks.md."""
    restore_best: bool = False
    """End with the weights of the epoch with the highest holdout agreement (ties: the lower holdout
    loss), not those of the last epoch."""
    loss: str = "kl"
    """``"kl"``: Hinton's loss (``temperature``, ``alpha``); ``"mse"``: mean squared error between the logits
    (Kim et al. 2021: matches the teacher's logits exactly rather than its softened probabilities; the two
    fields above are then unused)."""
    freeze_batchnorm: bool = False
    """BatchNorm layers stay in eval mode while the rest trains: they normalize with, and keep, their
    running statistics instead of each batch's. For a student that starts from the teacher's weights
    (pruning's recovery), whose statistics are already right or nearly so; batch statistics of small
    batches add noise the teacher never had."""
    keep_if_worse: bool = False
    """Undo the training when it made the student agree *less* with the teacher on the holdout than before
    it (the student keeps the weights it came with; pruning's recovery turns this on: a lightly pruned model
    can already be closer to the original than fine-tuning leaves it, e.g. mobilenet_v3_small at ratio 0.1:
    99.8% agreement before, 93.0% after)."""

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, 0)
        check_float("time_budget_s", self.time_budget_s, 0.0, low_open=True)
        check_float("temperature", self.temperature, 0.0, low_open=True)
        check_float("alpha", self.alpha, 0.0, 1.0)
        check_float("lr", self.lr, 0.0, low_open=True)
        check_int("batch_size", self.batch_size, 2)  # NOTE: BatchNorm cannot train on one sample
        check_float("weight_decay", self.weight_decay, 0.0)
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        for name in ("augment", "flip", "restore_best", "keep_if_worse", "freeze_batchnorm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        check_float("max_shift", self.max_shift, 0.0, 0.5, high_open=True)
        check_float("mixup", self.mixup, 0.0)
        check_float("cutmix", self.cutmix, 0.0)
        check_float("holdout_fraction", self.holdout_fraction, 0.0, 1.0, low_open=True, high_open=True)
        check_int("patience", self.patience, 0)

    @property
    def augmentation(self) -> Augmentation:
        """The per-batch transforms these settings ask for (``Augmentation.active`` is False for none)."""
        return Augmentation(
            max_shift=self.max_shift if self.augment else 0.0, flip=self.flip, mixup=self.mixup, cutmix=self.cutmix
        )


def check_distill_settings(name: str, value: object) -> None:
    """For technique configs' ``__post_init__``: the nested block must already be built (``config_from_dict``
    builds it from a JSON/YAML mapping)."""
    if not isinstance(value, DistillSettings):
        raise ValueError(f"{name} must be a DistillSettings (in a deploy config: a mapping), got {value!r}")


PRUNING_FIELDS_MOVED = {
    "finetune_epochs": "distillation.epochs",
    "finetune_time_budget_s": "distillation.time_budget_s",
    "temperature": "distillation.temperature",
    "alpha": "distillation.alpha",
    "lr": "distillation.lr",
}
"""The pruning configs' flat fields from before the ``distillation`` block, and where each went."""


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    """Hinton's loss: soft KL term scaled by T^2 plus hard CE against the teacher's argmax."""
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)
    hard = F.cross_entropy(student_logits, teacher_logits.argmax(dim=1))
    return alpha * soft + (1.0 - alpha) * hard


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, settings: DistillSettings) -> torch.Tensor:
    """The loss ``settings.loss`` names."""
    if settings.loss == "mse":
        return F.mse_loss(student_logits, teacher_logits)
    return kd_loss(student_logits, teacher_logits, settings.temperature, settings.alpha)


def _train_mode(student: nn.Module, settings: DistillSettings) -> None:
    """Train mode, BatchNorm left in eval mode with ``freeze_batchnorm``. Called at the start of every epoch:
    the holdout scoring between epochs restores plain ``train()``."""
    student.train()
    if settings.freeze_batchnorm:
        for module in student.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


@torch.no_grad()
def logits_of(model: nn.Module, inputs: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Eval-mode logits of ``model`` (on whatever device it lives) for ``inputs``, returned on ``device``."""
    model_device = next(model.parameters(), torch.empty(0)).device
    chunks = [
        model(inputs[i : i + _EVAL_BATCH].to(model_device)).to(device) for i in range(0, len(inputs), _EVAL_BATCH)
    ]
    return torch.cat(chunks)


def agreement(model: nn.Module, inputs: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Share of ``inputs`` on which ``model`` (in eval mode) predicts the teacher's top-1 class."""
    was_training = model.training
    model.eval()
    try:
        pred = logits_of(model, inputs, teacher_logits.device).argmax(dim=1)
    finally:
        model.train(was_training)
    return float((pred == teacher_logits.argmax(dim=1)).float().mean())


def distill(
    student: nn.Module,
    teacher: nn.Module,
    inputs: torch.Tensor,
    settings: DistillSettings,
    ctx: CompressionContext,
    *,
    before_step: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """Train ``student`` **in place** to mimic ``teacher`` on ``inputs``; returns it in eval mode.

    ``before_step(student)`` runs after each backward pass, before the optimizer step (e.g. to mask
    gradients). The teacher is only run in eval mode and is left unchanged. With ``settings.restore_best``
    the student ends with the weights of its best epoch on the holdout.
    """
    if inputs.ndim < 2 or len(inputs) < 2:
        raise ValueError(f"distillation needs at least 2 inputs, got shape {tuple(inputs.shape)}")
    aug = settings.augmentation
    if aug.active and inputs.ndim != 4:
        raise ValueError(
            f"augmentation (augment, flip, mixup, cutmix) needs images (N, C, H, W), got shape {tuple(inputs.shape)}"
        )
    device = ctx.device
    home = next(student.parameters()).device
    student.to(device)
    teacher_was_training = teacher.training
    teacher.eval()
    started = time.perf_counter()
    # NOTE: fork_rng keeps the seeding (dropout, init of anything lazy) from leaking into the caller.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        gen = torch.Generator().manual_seed(ctx.seed)
        order = torch.randperm(len(inputs), generator=gen)
        n_hold = max(1, int(round(len(inputs) * settings.holdout_fraction)))
        train_x = inputs[order[n_hold:]].to(device)
        hold_x = inputs[order[:n_hold]].to(device)
        try:
            hold_t = logits_of(teacher, hold_x, device)
            # NOTE: without augmentation the teacher's targets never change: compute them once.
            train_t = None if aug.active else logits_of(teacher, train_x, device)
            start = None
            if settings.keep_if_worse:
                start = _holdout_score(student, hold_x, hold_t, settings)[0], _state_copy(student)
            best = _Best(keep_state=settings.restore_best)
            _train(student, teacher, train_x, train_t, hold_x, hold_t, settings, ctx, gen, started, before_step, best)
            best.restore(student, ctx)
            if start is not None:
                _undo_if_worse(student, start, hold_x, hold_t, settings, ctx)
        finally:
            teacher.train(teacher_was_training)
    student.zero_grad(set_to_none=True)
    student.eval()
    return student.to(home)


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _undo_if_worse(
    student: nn.Module,
    start: tuple[float, dict[str, torch.Tensor]],
    hold_x: torch.Tensor,
    hold_t: torch.Tensor,
    settings: DistillSettings,
    ctx: CompressionContext,
) -> None:
    """``keep_if_worse``: back to the starting weights when training lowered the holdout agreement."""
    before, state = start
    after = _holdout_score(student, hold_x, hold_t, settings)[0]
    if after < before:
        student.load_state_dict(state)
        ctx.progress(
            f"distill kept the weights it started from: holdout agreement {before:.2%} before training, "
            f"{after:.2%} after"
        )


@dataclass
class _Best:
    """The best epoch on the holdout so far (for ``restore_best``) and the epochs since any improvement
    (for ``patience``)."""

    keep_state: bool
    epoch: int = 0
    agreement: float = -1.0
    loss: float = math.inf
    state: dict[str, torch.Tensor] | None = None
    lowest_loss: float = math.inf
    stale: int = 0
    """Epochs in a row in which neither the agreement nor the loss beat every earlier epoch's."""
    last_epoch: int = 0
    last_agreement: float = 0.0

    def record(self, epoch: int, agreement: float, loss: float, student: nn.Module) -> None:
        # NOTE: patience counts from the last improvement of either figure: agreement on a small holdout
        # moves in steps of one image and can stall for epochs while the loss still falls.
        improved = agreement > self.agreement or loss < self.lowest_loss
        self.stale = 0 if improved else self.stale + 1
        self.lowest_loss = min(self.lowest_loss, loss)
        self.last_epoch, self.last_agreement = epoch, agreement
        if (agreement, -loss) >= (self.agreement, -self.loss):  # NOTE: a full tie goes to the later epoch
            self.epoch, self.agreement, self.loss = epoch, agreement, loss
            if self.keep_state:
                self.state = _state_copy(student)

    def restore(self, student: nn.Module, ctx: CompressionContext) -> None:
        """Load the best epoch's weights into ``student`` unless they are the last epoch's already."""
        if self.state is None or self.epoch == self.last_epoch:
            return
        student.load_state_dict(self.state)
        ctx.progress(
            f"distill restored epoch {self.epoch}: agreement={self.agreement:.2%} holdout_loss={self.loss:.4f} "
            f"(last epoch {self.last_epoch}: agreement={self.last_agreement:.2%})"
        )


def _holdout_score(
    student: nn.Module, hold_x: torch.Tensor, hold_t: torch.Tensor, settings: DistillSettings
) -> tuple[float, float]:
    """Agreement with the teacher's top-1 and KD loss of ``student`` (in eval mode) on the holdout."""
    was_training = student.training
    student.eval()
    try:
        logits = logits_of(student, hold_x, hold_t.device)
    finally:
        student.train(was_training)
    agree = float((logits.argmax(dim=1) == hold_t.argmax(dim=1)).float().mean())
    return agree, float(distill_loss(logits, hold_t, settings))


def _train(
    student: nn.Module,
    teacher: nn.Module,
    train_x: torch.Tensor,
    train_t: torch.Tensor | None,
    hold_x: torch.Tensor,
    hold_t: torch.Tensor,
    settings: DistillSettings,
    ctx: CompressionContext,
    gen: torch.Generator,
    started: float,
    before_step: Callable[[nn.Module], None] | None,
    best: _Best,
) -> None:
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    aug = settings.augmentation
    n = len(train_x)
    steps_per_epoch = math.ceil(n / settings.batch_size)
    total_steps = max(1, settings.epochs * steps_per_epoch)
    step = 0
    for epoch in range(1, settings.epochs + 1):
        _train_mode(student, settings)
        perm = torch.randperm(n, generator=gen)
        loss_sum, seen, out_of_time = 0.0, 0, False
        for start in range(0, n, settings.batch_size):
            idx = perm[start : start + settings.batch_size]
            if len(idx) < 2:  # NOTE: BatchNorm cannot train on a single sample
                continue
            elapsed = time.perf_counter() - started
            if elapsed >= settings.time_budget_s:
                out_of_time = True
                break
            progress = step / total_steps
            # NOTE: anneal by the clock only where the budget binds (the steps planned would not fit in it):
            # a run that fits stays a function of its seed, whatever the machine's speed that day.
            if step and elapsed / step * total_steps > settings.time_budget_s:
                progress = max(progress, elapsed / settings.time_budget_s)
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
            x = train_x[idx.to(train_x.device)]
            if train_t is None:  # NOTE: None exactly when augmenting: the teacher labels the batch as transformed
                x = augment(x, aug, gen)
                t = logits_of(teacher, x, x.device)
            else:
                t = train_t[idx.to(train_t.device)]
            loss = distill_loss(student(x), t, settings)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if before_step is not None:
                before_step(student)
            optimizer.step()
            step += 1
            loss_sum += float(loss.detach()) * len(idx)
            seen += len(idx)
        if seen:
            hold_agreement, hold_loss = _holdout_score(student, hold_x, hold_t, settings)
            best.record(epoch, hold_agreement, hold_loss, student)
            ctx.progress(
                f"distill epoch {epoch}/{settings.epochs}: loss={loss_sum / seen:.4f} "
                f"agreement={hold_agreement:.2%} holdout_loss={hold_loss:.4f} "
                f"elapsed={time.perf_counter() - started:.1f}s"
            )
        if out_of_time:
            ctx.progress(f"distill stopped by time budget ({settings.time_budget_s:g}s) in epoch {epoch}")
            break
        if settings.patience and best.stale >= settings.patience and epoch < settings.epochs:
            ctx.progress(
                f"distill stopped early in epoch {epoch}: no holdout improvement in {settings.patience} epochs"
            )
            break
