"""The predictor that serves a model's original variant: the same one the compression search times."""

from __future__ import annotations

import torch

from compression.models.loading import LoadedModel
from compression.runtimes.cuda_support import require_cuda
from compression.runtimes.eager import reference_predictor
from compression.runtimes.predictor import Predictor
from server.config.settings import ModelSettings


def original_predictor(loaded: LoadedModel, settings: ModelSettings) -> Predictor:
    """Run the loaded module eagerly on the model's device; CPU float32 batches in, logits out.

    On CUDA the module moves to the GPU (NHWC on tensor-core GPUs) and inputs are staged through pinned
    memory (``compression.runtimes.predictor.InputStager``); a missing GPU fails here, with the reason.
    """
    device = require_cuda(torch.device(settings.device))
    return reference_predictor(loaded.module, device, loaded.input_shape, settings.batching.max_batch_size)
