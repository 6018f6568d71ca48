"""The resnet18 every server in the serving benchmark loads: torchvision's architecture, random weights.

    .venv/bin/python benchmarks/peers/weights.py build/peers/resnet18.pt

Seed-fixed, written once (an existing file is kept), saved as a plain state_dict so that slimserve
(``torch.load(weights_only=True)``), the MLServer runtime and the TorchServe handler read the same
tensors. No download: the point is identical weights, not a trained model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torchvision

SEED = 0
NUM_CLASSES = 1000


def build_resnet18(weights: Path | None = None) -> torch.nn.Module:
    """torchvision resnet18 in eval mode, with ``weights`` loaded when given."""
    model = torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES)
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def write_weights(path: Path) -> None:
    """Write the seed-fixed random state_dict to ``path`` unless it is already there."""
    if path.exists():
        return
    torch.manual_seed(SEED)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(build_resnet18().state_dict(), partial)
    partial.rename(path)


if __name__ == "__main__":
    write_weights(Path(sys.argv[1]))
    print(sys.argv[1])
