"""Small test architectures with the layers the search must cope with."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from compression.search.data import EvalData


def _block(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU())


class OddNet(nn.Module):
    """Strided stem, depthwise + pointwise convs, a transposed conv, then a linear classifier."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _block(nn.Conv2d(in_channels, 16, 3, stride=2, padding=1, bias=False), 16),
            _block(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), 16),  # depthwise
            _block(nn.Conv2d(16, 32, 1, bias=False), 32),  # pointwise
            _block(nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=False), 32),
            _block(nn.ConvTranspose2d(32, 16, 2, stride=2, bias=False), 16),  # transposed
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def calibrated(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Re-estimate BatchNorm statistics on ``images`` (random weights, realistic activations)."""
    model.train()
    with torch.no_grad():
        for start in range(0, len(images), 64):
            model(images[start : start + 64])
    return model.eval()


class SleepyNet(nn.Module):
    """Takes ``delay_s`` per forward pass (sleeping, as a slow model would): queues and deadlines become visible."""

    def __init__(self, delay_s: float = 0.3, in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.head = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_s)
        return self.head(torch.flatten(x, 1))


def random_eval_data() -> EvalData:
    """Seeded random 1x8x8 images: 16 for calibration, 40 for validation with labels in 3 classes (a search's
    control flow, not its accuracy, is what tests using it check)."""
    gen = torch.Generator().manual_seed(1)
    return EvalData(
        calibration=torch.randn(16, 1, 8, 8, generator=gen),
        validation=torch.randn(40, 1, 8, 8, generator=gen),
        validation_labels=np.random.default_rng(2).integers(0, 3, 40),
    )
