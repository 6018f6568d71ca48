"""KServe v2 over HTTP <-> the protocol's protobuf messages, so both transports share one codec.

A JSON (and Triton binary tensor extension) request becomes the ``ModelInferRequest`` a gRPC client
would have sent, and the ``ModelInferResponse`` becomes JSON (plus binary tensors where asked): parsing,
validation and error messages are those of ``kserve_codec``. Binary extension: the body is the JSON
header (``Inference-Header-Content-Length`` bytes) followed by each tensor whose ``parameters`` carry
``binary_data_size``, in order. Whatever a client sends, parsing returns or raises InvalidArgument (a 400),
never another exception (a 500): tests/unit/server/transport/test_fuzz_parsing.py fuzzes it.
"""

from __future__ import annotations

import base64
import binascii
import json
import reprlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from protos import classifier_pb2
from protos import grpc_service_pb2 as pb
from protos.errors import InvalidArgument
from protos.tensors import DATATYPES, TYPED_CONTENTS_FIELD, decode_bytes_tensor
from server.transport.kserve_codec import CLASSIFICATION

INFERENCE_HEADER = "Inference-Header-Content-Length"
BINARY_DATA = "binary_data"
BINARY_DATA_SIZE = "binary_data_size"
BINARY_DATA_OUTPUT = "binary_data_output"
"""Request parameter: send every output as binary (what ``tritonclient.http`` asks when it names none)."""
_REST_ONLY_PARAMETERS = {BINARY_DATA, BINARY_DATA_SIZE, BINARY_DATA_OUTPUT}
_BINARY_ONLY_TYPES = {"FP16", "BF16", "BYTES"}
"""v2 datatypes a JSON request cannot carry as numbers in 'data' (Triton's HTTP endpoint refuses them too)."""
_INT64_TYPES = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


@dataclass(frozen=True)
class HttpInferRequest:
    request: pb.ModelInferRequest
    binary_outputs: dict[str, bool]
    """Per requested output name: answer with binary data (True) or JSON ``data``."""
    binary_by_default: bool
    """For outputs the request does not name."""


def parse_infer_request(body: bytes, header_length: str | None, model: str, version: str) -> HttpInferRequest:
    """The HTTP body of ``POST .../infer`` as a ``ModelInferRequest``; InvalidArgument says what is wrong."""
    json_end = _header_length(header_length, len(body))
    header = _json_object(body[:json_end], "inference request")
    request_id = _string(header.get("id", ""), "the request 'id'")
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument("the inference request needs a non-empty 'inputs' list")
    offset = json_end
    for index, tensor in enumerate(inputs):
        offset = _add_input(request, tensor, index, body, offset)
    if offset != len(body):
        raise InvalidArgument(
            f"{len(body) - json_end} bytes of binary data follow the JSON header, but the inputs' "
            f"{BINARY_DATA_SIZE} add up to {offset - json_end}"
        )
    parameters = _object(header.get("parameters", {}), "request 'parameters'")
    binary_by_default = _bool(parameters.get(BINARY_DATA_OUTPUT, False), f"parameter {BINARY_DATA_OUTPUT!r}")
    binary_outputs: dict[str, bool] = {}
    outputs = header.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidArgument("'outputs' must be a list")
    for tensor in outputs:
        tensor = _object(tensor, "each entry of 'outputs'")
        name = _string(tensor.get("name"), "output 'name'")
        output_parameters = _object(tensor.get("parameters", {}), f"parameters of output {name!r}")
        binary_outputs[name] = _bool(output_parameters.get(BINARY_DATA, binary_by_default), f"output {name!r} binary")
        requested = request.outputs.add(name=name)
        _copy_parameters(output_parameters, requested.parameters)
    _copy_parameters(parameters, request.parameters)
    return HttpInferRequest(request, binary_outputs, binary_by_default)


def infer_response_body(response: pb.ModelInferResponse, parsed: HttpInferRequest) -> tuple[bytes, int | None]:
    """The HTTP body for ``response``, and the JSON header's length when binary tensors follow it."""
    outputs, blobs = [], []
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if parsed.binary_outputs.get(tensor.name, parsed.binary_by_default):
            entry["parameters"] = {BINARY_DATA_SIZE: len(raw)}
            blobs.append(raw)
        elif tensor.datatype == "BYTES":
            entry["data"] = [element.decode("utf-8", errors="replace") for element in decode_bytes_tensor(raw)]
        else:
            entry["data"] = np.frombuffer(raw, dtype=DATATYPES[tensor.datatype]).tolist()
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        document["id"] = response.id
    document["outputs"] = outputs
    header = json.dumps(document, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def classify_request(model: str, version: str, images: list[bytes], top_k: object) -> classifier_pb2.ClassifyRequest:
    """``POST .../classify`` as the ``Classify`` RPC's request (``top_k`` as sent: number or form text)."""
    return classifier_pb2.ClassifyRequest(model_name=model, variant=version, images=images, top_k=_top_k(top_k))


def parse_classify_json(body: bytes, model: str, version: str) -> classifier_pb2.ClassifyRequest:
    """``{"images": [base64, ...], "top_k": k}``."""
    document = _json_object(body, "classify request")
    encoded = document.get("images")
    if not isinstance(encoded, list):
        raise InvalidArgument("the classify request needs 'images': a list of base64-encoded images")
    images = [_base64(item, index) for index, item in enumerate(encoded)]
    return classify_request(model, version, images, document.get("top_k", 0))


def message_json(message: Message) -> dict[str, Any]:
    """A protobuf message as the JSON the v2 REST protocol uses: field names as in the .proto, every field
    present, 64-bit integers as numbers (protobuf's own JSON mapping quotes them)."""
    document = json_format.MessageToDict(
        message, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
    )
    return _unquote_int64(document, message.DESCRIPTOR)


def _unquote_int64(document: dict[str, Any], descriptor: Descriptor) -> dict[str, Any]:
    for field in descriptor.fields:
        if field.name not in document:
            continue
        value = document[field.name]
        message_type = field.message_type
        if message_type is not None and message_type.GetOptions().map_entry:
            value_field = message_type.fields_by_name["value"]
            document[field.name] = {key: _json_value(item, value_field) for key, item in value.items()}
        elif _is_repeated(field):
            document[field.name] = [_json_value(item, field) for item in value]
        else:
            document[field.name] = _json_value(value, field)
    return document


def _is_repeated(field: FieldDescriptor) -> bool:
    # NOTE: `label` is deprecated in newer protobuf releases in favour of `is_repeated`.
    repeated = getattr(field, "is_repeated", None)
    return bool(repeated) if repeated is not None else field.label == FieldDescriptor.LABEL_REPEATED


def _json_value(value: Any, field: FieldDescriptor) -> Any:
    if field.message_type is not None and isinstance(value, dict):
        return _unquote_int64(value, field.message_type)
    if field.type in _INT64_TYPES and isinstance(value, str):
        return int(value)
    return value


def _header_length(value: str | None, body_length: int) -> int:
    if value is None:
        return body_length
    # NOTE: ASCII digits only, as HTTP's own Content-Length (int() would also take " 3", "+3", "1_0", "٣").
    if not (value.isascii() and value.isdigit()):
        raise InvalidArgument(f"{INFERENCE_HEADER} must be an integer, got {reprlib.repr(value)}")
    length = int(value)
    if not 0 < length <= body_length:
        raise InvalidArgument(f"{INFERENCE_HEADER} is {length}, but the body has {body_length} bytes")
    return length


def _add_input(request: pb.ModelInferRequest, tensor: object, index: int, body: bytes, offset: int) -> int:
    """Append input ``index`` to ``request``; returns the offset of the next binary tensor in ``body``."""
    tensor = _object(tensor, f"input {index}")
    name = _string(tensor.get("name"), f"input {index} 'name'")
    datatype = _string(tensor.get("datatype"), f"input {name!r} 'datatype'")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidArgument(f"input {name!r} 'shape' must be a list of integers, got {reprlib.repr(shape)}")
    parameters = _object(tensor.get("parameters", {}), f"parameters of input {name!r}")
    try:
        entry = request.inputs.add(name=name, datatype=datatype, shape=shape)
    except ValueError:
        raise InvalidArgument(f"input {name!r} 'shape' {reprlib.repr(shape)} is out of range") from None
    _copy_parameters(parameters, entry.parameters)
    size = parameters.get(BINARY_DATA_SIZE)
    if size is not None:
        if "data" in tensor:
            raise InvalidArgument(f"input {name!r} has both 'data' and {BINARY_DATA_SIZE}: send its data once")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidArgument(f"input {name!r}: {BINARY_DATA_SIZE} must be an integer >= 0, got {size!r}")
        if offset + size > len(body):
            raise InvalidArgument(
                f"input {name!r}: {BINARY_DATA_SIZE} is {size}, but only {len(body) - offset} bytes of binary data "
                "are left in the body"
            )
        request.raw_input_contents.append(body[offset : offset + size])
        return offset + size
    if "data" not in tensor:
        raise InvalidArgument(f"input {name!r} has no data: send 'data' or binary data with {BINARY_DATA_SIZE}")
    field = TYPED_CONTENTS_FIELD.get(datatype)
    if field is None:
        if datatype not in _BINARY_ONLY_TYPES:
            raise InvalidArgument(f"input {name!r}: unknown datatype {datatype!r}")
        raise InvalidArgument(f"input {name!r}: datatype {datatype!r} cannot be sent as JSON 'data'; send it binary")
    try:
        # NOTE: out-of-range floats become inf (as a float32 would); out-of-range integers raise OverflowError.
        with np.errstate(over="ignore"):
            values = np.asarray(tensor["data"], dtype=DATATYPES[datatype]).ravel()
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidArgument(f"input {name!r}: 'data' is not a (nested) list of {datatype} numbers: {exc}") from None
    getattr(entry.contents, field).extend(values.tolist())
    return offset


def _copy_parameters(parameters: dict[str, Any], target: Any) -> None:
    """JSON parameters -> ``InferParameter`` map entries (the binary-extension ones stay in HTTP)."""
    for key, value in parameters.items():
        if key in _REST_ONLY_PARAMETERS:
            continue
        _string(key, "a parameter name")
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int) and -(2**63) <= value < 2**63:
            target[key].int64_param = value
        elif isinstance(value, int) and 0 <= value < 2**64:
            target[key].uint64_param = value
        elif isinstance(value, int):
            raise InvalidArgument(f"parameter {key!r} is out of the 64-bit range: {reprlib.repr(value)}")
        elif isinstance(value, float):
            target[key].double_param = value
        elif isinstance(value, str):
            target[key].string_param = _string(value, f"parameter {key!r}")
        elif key == CLASSIFICATION:
            # NOTE: kept as a string so kserve_codec reports it with its usual message.
            target[key].string_param = json.dumps(value)
        else:
            raise InvalidArgument(f"parameter {key!r} must be a boolean, number or string, got {reprlib.repr(value)}")


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidArgument(f"the {what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidArgument(f"the {what} is nested too deeply to parse") from None
    return _object(document, f"the {what}")


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {reprlib.repr(value)}")
    return value


def _string(value: object, what: str) -> str:
    """``value`` if it is a string protobuf can hold: JSON's ``\\ud800`` escapes decode to lone surrogates,
    which are not UTF-8."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {reprlib.repr(value)}")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} is not valid Unicode (a lone surrogate): {reprlib.repr(value)}") from None
    return value


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{what} must be true or false, got {reprlib.repr(value)}")
    return value


def _base64(item: object, index: int) -> bytes:
    if not isinstance(item, str):
        raise InvalidArgument(f"images[{index}] must be a base64 string, got {reprlib.repr(item)}")
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"images[{index}] is not valid base64") from None


def _top_k(value: object) -> int:
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            pass  # reported below, with the value as sent
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise InvalidArgument(f"top_k must be an integer >= 0 (0 = the server default), got {reprlib.repr(value)}")
    return value
