"""KServe v2 ``ModelInferRequest`` -> input array, and logits -> ``ModelInferResponse``."""

from __future__ import annotations

import reprlib
from dataclasses import dataclass

import numpy as np

from compression.models.names import INPUT_NAME, OUTPUT_NAME
from protos import grpc_service_pb2 as pb
from protos.errors import InvalidArgument
from protos.tensors import (
    TYPED_CONTENTS_FIELD,
    array_from_raw,
    array_from_typed,
    classification_strings,
    encode_bytes_tensor,
)
from server.variants.registry import ServedModel

INPUT_DATATYPE = "FP32"
CLASSIFICATION = "classification"


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    classification: int | None
    """Top-k for the classification extension, or None for the raw tensor."""


def parse_inputs(request: pb.ModelInferRequest, model: ServedModel) -> np.ndarray:
    """The request's one input tensor as (batch, C, H, W) float32, viewed without copying when raw."""
    if len(request.inputs) != 1 or request.inputs[0].name != INPUT_NAME:
        names = [t.name for t in request.inputs]
        raise InvalidArgument(f"model {model.name!r} takes exactly one input named {INPUT_NAME!r}, got {names}")
    tensor = request.inputs[0]
    what = f"input {INPUT_NAME!r}"
    if tensor.datatype != INPUT_DATATYPE:
        raise InvalidArgument(f"{what} must be {INPUT_DATATYPE}, got datatype {tensor.datatype!r}")
    shape = list(tensor.shape)
    expected = [-1, *model.input_shape]
    if len(shape) != 4 or shape[1:] != list(model.input_shape):
        raise InvalidArgument(f"{what} has shape {shape}, expected {expected}")
    if not 1 <= shape[0] <= model.max_batch_size:
        raise InvalidArgument(f"{what}: batch size {shape[0]} is outside 1..{model.max_batch_size}")
    typed = [f"contents.{field.name}" for field, _ in tensor.contents.ListFields()]
    if request.raw_input_contents:
        if typed:
            raise InvalidArgument(f"{what} has both raw_input_contents and {typed[0]}: send its data once")
        if len(request.raw_input_contents) != 1:
            raise InvalidArgument(f"{len(request.raw_input_contents)} raw_input_contents entries for 1 input")
        return array_from_raw(request.raw_input_contents[0], INPUT_DATATYPE, shape, what)
    field = TYPED_CONTENTS_FIELD[INPUT_DATATYPE]
    if not typed:
        raise InvalidArgument(f"{what} has no data: send raw_input_contents or contents.{field}")
    if typed != [f"contents.{field}"]:
        raise InvalidArgument(f"{what} is {INPUT_DATATYPE}: send its values in contents.{field} only, got {typed}")
    return array_from_typed(getattr(tensor.contents, field), INPUT_DATATYPE, shape, what)


def parse_outputs(request: pb.ModelInferRequest) -> list[RequestedOutput]:
    """The outputs asked for (all of them when none are named), with classification top-k if asked."""
    if not request.outputs:
        return [RequestedOutput(OUTPUT_NAME, None)]
    parsed = []
    for output in request.outputs:
        if output.name != OUTPUT_NAME:
            raise InvalidArgument(f"unknown output {output.name!r}; this model has {OUTPUT_NAME!r}")
        parsed.append(RequestedOutput(output.name, _classification_k(output.parameters)))
    return parsed


def build_response(
    request: pb.ModelInferRequest,
    model: ServedModel,
    variant_name: str,
    logits: np.ndarray,
    outputs: list[RequestedOutput],
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model.name, model_version=variant_name, id=request.id)
    batch = logits.shape[0]
    for output in outputs:
        tensor = response.outputs.add(name=output.name)
        if output.classification is None:
            tensor.datatype = "FP32"
            tensor.shape.extend(logits.shape)
            response.raw_output_contents.append(logits.tobytes())
        else:
            strings = classification_strings(logits, output.classification, model.labels)
            tensor.datatype = "BYTES"
            tensor.shape.extend([batch, len(strings) // batch])
            response.raw_output_contents.append(encode_bytes_tensor(strings))
    return response


def _classification_k(parameters: object) -> int | None:
    params = dict(parameters)  # type: ignore[call-overload]
    if CLASSIFICATION not in params:
        return None
    param = params[CLASSIFICATION]
    kind = param.WhichOneof("parameter_choice")
    value: object = getattr(param, kind) if kind else None
    if kind == "string_param" and isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            pass  # reported below, with the value as sent
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(
            f"output parameter {CLASSIFICATION!r} must be a positive integer (the top-k), got {reprlib.repr(value)}"
        )
    return value
