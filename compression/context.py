"""What a compression technique may use besides the model it transforms."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

log = logging.getLogger("slimserve.compression")


@dataclass
class CompressionContext:
    """Inputs shared by every technique of one search.

    ``calibration_inputs`` come from the calibration split (never from the validation split that
    accuracy is measured on); techniques that train (pruning recovery, students) or calibrate
    (int8) use only these.
    """

    calibration_inputs: torch.Tensor
    """Preprocessed float32 images, shape (N, C, H, W); labels are not needed."""
    example_inputs: torch.Tensor
    """A batch at the served batch size, shape (B, C, H, W), for export and tracing."""
    teacher: nn.Module
    """The original model in eval mode: the reference for distillation and agreement."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    progress: Callable[[str], None] = log.info
    """Where long-running techniques report progress (one line per step)."""
