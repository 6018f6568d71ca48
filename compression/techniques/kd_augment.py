"""Augmentations of the distillation loop: a batch is transformed once and teacher and student both see it.

In knowledge distillation the teacher labels whatever image it is shown, so an augmentation need not
preserve the class: a mirrored digit or a blend of two images is a valid input as long as the target is
the teacher's output on that very image ("consistent teaching", Beyer et al. 2022, *Knowledge
distillation: a good teacher is patient and consistent*). Mixing is therefore KD on mixed inputs, not
mixed labels. Every draw comes from one seeded ``torch.Generator`` and is vectorised over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augmentation:
    """What :func:`augment` does to each batch (every part off by default)."""

    max_shift: float = 0.0
    """Random translation by up to this share of the image size (0: none)."""
    flip: bool = False
    """Mirror left-right with probability 1/2."""
    mixup: float = 0.0
    """Alpha of the Beta distribution of the blending weight (0: no mixup)."""
    cutmix: float = 0.0
    """Alpha of the Beta distribution of the share of the image kept outside the pasted box (0: no CutMix)."""

    @property
    def active(self) -> bool:
        return self.max_shift > 0 or self.flip or self.mixup > 0 or self.cutmix > 0


def augment(batch: torch.Tensor, aug: Augmentation, gen: torch.Generator) -> torch.Tensor:
    """Shift, then flip, then mix ``batch`` (N, C, H, W); returns ``batch`` itself when ``aug`` does nothing."""
    if aug.max_shift > 0:
        batch = shift(batch, aug.max_shift, gen)
    if aug.flip:
        batch = flip(batch, gen)
    if aug.mixup > 0 or aug.cutmix > 0:
        batch = mix(batch, aug.mixup, aug.cutmix, gen)
    return batch


def shift(batch: torch.Tensor, max_shift: float, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` of its size; borders are replicated."""
    n = batch.shape[0]
    # NOTE: affine_grid coordinates span [-1, 1], so a shift of ``max_shift`` of the size is 2 * max_shift.
    offsets = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 * max_shift)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, :, 2] = offsets
    grid = F.affine_grid(theta.to(batch.device, batch.dtype), list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)


def flip(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2 (exactly: no resampling)."""
    mirrored = torch.rand(batch.shape[0], generator=gen) < 0.5
    return torch.where(mirrored.to(batch.device).view(-1, 1, 1, 1), batch.flip(-1), batch)


def mix(batch: torch.Tensor, mixup: float, cutmix: float, gen: torch.Generator) -> torch.Tensor:
    """Mix each image with a random partner from the same batch: mixup (a blend) or CutMix (a pasted box).

    The weight ``lam`` of the image itself is drawn per image from Beta(alpha, alpha). With both alphas
    positive each image gets one of the two at random.
    """
    n, _, height, width = batch.shape
    device = batch.device
    partner = batch[torch.randperm(n, generator=gen).to(device)]
    if mixup > 0 and cutmix > 0:
        use_cutmix = torch.rand(n, generator=gen) < 0.5
    else:
        use_cutmix = torch.full((n,), cutmix > 0)
    alphas = torch.where(use_cutmix, cutmix, mixup).double().numpy()
    # NOTE: torch's Beta sampler takes no generator; numpy's, seeded from ``gen``, keeps one seeded stream.
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
    lam = torch.from_numpy(rng.beta(alphas, alphas)).to(batch.dtype)
    out = batch
    if mixup > 0:
        w = torch.where(use_cutmix, 1.0, lam).to(device).view(-1, 1, 1, 1)
        out = w * batch + (1 - w) * partner
    if cutmix > 0:
        # NOTE: a box covering 1 - lam of the image (clipped at the borders, as in Yun et al. 2019).
        side = torch.sqrt(1 - lam)
        cy = torch.rand(n, generator=gen) * height
        cx = torch.rand(n, generator=gen) * width
        y0, y1 = (cy - side * height / 2).round(), (cy + side * height / 2).round()
        x0, x1 = (cx - side * width / 2).round(), (cx + side * width / 2).round()
        ys = torch.arange(height, dtype=lam.dtype).view(1, -1, 1)
        xs = torch.arange(width, dtype=lam.dtype).view(1, 1, -1)
        inside = (
            (ys >= y0.view(-1, 1, 1)) & (ys < y1.view(-1, 1, 1)) & (xs >= x0.view(-1, 1, 1)) & (xs < x1.view(-1, 1, 1))
        )
        box = (inside & use_cutmix.view(-1, 1, 1)).unsqueeze(1).to(device)
        out = torch.where(box, partner, out)
    return out
