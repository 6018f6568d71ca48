"""TorchServe handler for the serving benchmark: the shared resnet18 state_dict, run with torch.

Archived by ``setup_torchserve.sh`` into ``resnet18.mar`` together with ``weights.py`` and the state_dict.
Each request carries one raw little-endian FP32 tensor ``(rows, 3, 224, 224)`` under the input key
``data`` (gRPC ``PredictionsRequest.input``); the answer is that request's logits, raw FP32 bytes.
TorchServe batches requests itself (``batchSize``/``maxBatchDelay``); ``handle`` gets the list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from weights import build_resnet18

INPUT_KEY = "data"
INPUT_SHAPE = (3, 224, 224)


class ResNet18Handler:
    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.initialized = False

    def initialize(self, context: Any) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        self.model = build_resnet18(model_dir / context.manifest["model"]["serializedFile"])
        self.initialized = True

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes]:
        rows = [np.frombuffer(item[INPUT_KEY], np.float32).reshape(-1, *INPUT_SHAPE) for item in data]
        assert self.model is not None
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(np.concatenate(rows))).numpy()
        answers, offset = [], 0
        for row in rows:
            answers.append(logits[offset : offset + len(row)].tobytes())
            offset += len(row)
        return answers


_service = ResNet18Handler()


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[bytes] | None:
    """TorchServe's module-level entry point."""
    if not _service.initialized:
        _service.initialize(context)
    return None if data is None else _service.handle(data, context)
