"""Guards the zero-copy hot path, by memory identity and allocation size (nothing is timed).

Protobuf hands ``raw_input_contents[0]`` out as a fresh ``bytes`` object (upb copies it out of the
message on every access: one unavoidable copy); from there to the tensor the model sees, a lone
request must not be copied again. On the way out the logits are copied once, into the response.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from compression.models.names import INPUT_NAME
from compression.runtimes.eager import EagerPredictor
from protos import grpc_service_pb2 as pb
from server.batching.batcher import DynamicBatcher
from server.transport.kserve_codec import build_response, parse_inputs, parse_outputs

SHAPE = (3, 64, 64)
MODEL: Any = SimpleNamespace(name="m", input_shape=SHAPE, max_batch_size=8, labels=None)


def infer_request(batch: int) -> pb.ModelInferRequest:
    array = np.random.default_rng(0).standard_normal((batch, *SHAPE), dtype=np.float32)
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name=INPUT_NAME, datatype="FP32", shape=array.shape)
    request.raw_input_contents.append(array.tobytes())
    return request


def root_buffer(array: np.ndarray) -> object:
    """The object at the end of ``array``'s ``base`` chain: what its memory belongs to."""
    owner: object = array
    while isinstance(owner, np.ndarray) and owner.base is not None:
        owner = owner.base
    return owner


def peak_allocation(call: Callable[[], object]) -> tuple[object, int]:
    """``call()``'s result and the peak bytes it allocated through Python's allocators (numpy included)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


class Recorder(torch.nn.Module):
    """Remembers the input it was given and the output it returned."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.returned: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        self.returned.append(x.flatten(1)[:, :10] * 2)
        return self.returned[-1]


def run_batcher(model: Recorder, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Submit ``inputs`` together to a batcher serving ``model`` as the server does; their outputs."""
    predictor = EagerPredictor(model, precision="fp32", device=torch.device("cpu"), input_shape=SHAPE, max_batch_size=8)

    async def scenario() -> list[np.ndarray]:
        batcher = DynamicBatcher(
            predictor, ThreadPoolExecutor(1), max_batch_size=8, max_queue_delay_s=0.05, max_queue_size=16
        )
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        await batcher.stop()
        return [r.outputs for r in results]

    return asyncio.run(scenario())


def test_raw_contents_become_a_view_of_the_request_bytes() -> None:
    request = infer_request(batch=4)
    nbytes = len(request.raw_input_contents[0])
    array, peak = peak_allocation(lambda: parse_inputs(request, MODEL))
    assert isinstance(array, np.ndarray) and array.shape == (4, *SHAPE) and not array.flags.owndata
    owner = root_buffer(array)
    assert isinstance(owner, bytes) and len(owner) == nbytes and owner == request.raw_input_contents[0]
    # the one copy protobuf makes when it hands out the field; a second copy would double this
    assert peak < 1.5 * nbytes


def test_a_lone_request_reaches_the_model_without_a_copy() -> None:
    model = Recorder()
    array = parse_inputs(infer_request(batch=2), MODEL)
    (outputs,) = run_batcher(model, [array])
    assert model.seen[0].data_ptr() == array.ctypes.data  # no concatenate, no contiguous() copy
    assert np.shares_memory(outputs, model.returned[0].numpy())  # the output is not copied back either


def test_rows_of_a_shared_batch_are_copied_once_and_answered_as_views() -> None:
    model = Recorder()
    arrays = [parse_inputs(infer_request(batch=1), MODEL) for _ in range(3)]
    outputs = run_batcher(model, arrays)
    assert sum(x.shape[0] for x in model.seen) == 3
    for out in outputs:
        assert any(np.shares_memory(out, returned.numpy()) for returned in model.returned)


def test_logits_are_copied_once_into_the_response() -> None:
    logits = np.random.default_rng(1).standard_normal((8, 200_000), dtype=np.float32)
    request = infer_request(batch=1)
    response, peak = peak_allocation(lambda: build_response(request, MODEL, "original", logits, parse_outputs(request)))
    assert isinstance(response, pb.ModelInferResponse)
    assert response.raw_output_contents[0] == logits.tobytes()
    assert peak < 1.5 * logits.nbytes
