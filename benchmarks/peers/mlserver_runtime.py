"""MLServer custom runtime for the serving benchmark: the shared resnet18 state_dict, run with torch.

Runs inside MLServer's own venv (``build/peers/mlserver``), imported as ``mlserver_runtime.ResNet18Runtime``
with ``benchmarks/peers`` on ``PYTHONPATH``. The forward pass runs on a worker thread, off MLServer's
event loop (as slimserve does), so the comparison is of the servers, not of a naive runtime.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri
from weights import build_resnet18


class ResNet18Runtime(MLModel):
    async def load(self) -> bool:
        self._model = build_resnet18(Path(await get_model_uri(self.settings)))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        # NOTE: MLServer has already unpacked raw_input_contents into a Python list of floats (its
        # raw.unpack), and its adaptive batcher has concatenated the requests: that is MLServer's cost.
        batch = NumpyCodec.decode_input(payload.inputs[0])
        logits = await asyncio.to_thread(self._forward, batch)
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("logits", logits)])

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self._model(torch.from_numpy(np.ascontiguousarray(batch, np.float32))).numpy()
