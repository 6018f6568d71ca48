"""The predictor that serves a model's original variant: the same one the compression search times."""

from __future__ import annotations

import torch

from compression.predictor import Predictor
from compression.runtime_eager import EagerPredictor
from server.loading import LoadedModel
from server.settings import ModelSettings


def original_predictor(loaded: LoadedModel, settings: ModelSettings) -> Predictor:
    """Run the loaded module eagerly on the model's device; CPU float32 batches in, logits out."""
    device = torch.device(settings.device)
    return EagerPredictor(
        loaded.module.eval().to(device),
        precision="fp32",
        device=device,
        input_shape=loaded.input_shape,
        max_batch_size=settings.batching.max_batch_size,
    )
