"""Property-based fuzzing of what a client controls: ModelInfer fields, the HTTP/REST infer and classify
bodies, and encoded image bytes.

Whatever arrives, parsing either succeeds with a well-formed result or raises a ``ServingError`` (a clean
gRPC status for the caller, a 4xx over HTTP); any other exception would reach the caller as INTERNAL (500)
and is a bug.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from compression.models.images import ImagePreprocessor
from compression.models.names import OUTPUT_NAME
from compression.models.settings import PreprocessingSettings
from protos import grpc_service_pb2 as pb
from protos.errors import InvalidArgument, ServingError
from protos.tensors import DATATYPES
from server.config.settings import default_config
from server.transport.kserve_codec import parse_inputs, parse_outputs
from server.transport.rest_codec import parse_classify_json, parse_infer_request
from server.variants.registry import ServedModel

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
ROW = 28 * 28 * 4

SETTINGS = default_config().models[0]
GRAY = ImagePreprocessor(SETTINGS.preprocessing, max_pixels=1_000_000)
RGB = ImagePreprocessor(PreprocessingSettings(resize=40, crop=32), max_pixels=1_000_000)
MODEL = ServedModel(SETTINGS, [str(i) for i in range(10)], (1, 28, 28), 10, GRAY)

# --- strategies ------------------------------------------------------------------------------------

int64 = st.integers(-(2**63), 2**63 - 1)
names = st.sampled_from(["input", "", "mask", "INPUT"]) | st.text(max_size=6)
datatypes = st.sampled_from([*DATATYPES, "BYTES", "BF16", "", "fp32"]) | st.text(max_size=6)
shapes = st.one_of(
    st.integers(-3, 40).map(lambda batch: [batch, 1, 28, 28]),
    st.lists(st.integers(-3, 40), max_size=6),
    st.lists(int64, max_size=5),
)
raw_contents = st.lists(st.integers(0, 3).map(lambda rows: b"\0" * ROW * rows) | st.binary(max_size=64), max_size=3)
typed_values = {
    "fp32_contents": st.lists(st.floats(width=32), max_size=3 * 28 * 28),
    "int_contents": st.lists(st.integers(-(2**31), 2**31 - 1), max_size=8),
    "bytes_contents": st.lists(st.binary(max_size=8), max_size=3),
}
tricky_numbers = st.sampled_from(["²", "٣", "9" * 5000, " 3 ", "+3", "3.0", "1_0", "0x10", "\x00", "-0", "1e3"])
"""Strings that look like integers to one parser and not to another (Unicode digits, int's digit limit)."""
parameter_values = st.one_of(
    st.tuples(st.just("bool_param"), st.booleans()),
    st.tuples(st.just("int64_param"), int64),
    st.tuples(st.just("uint64_param"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("double_param"), st.floats()),
    st.tuples(st.just("string_param"), st.text(max_size=12) | st.integers(-5, 10**30).map(str) | tricky_numbers),
)


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="digits")
    for _ in range(draw(st.integers(0, 2))):
        tensor = request.inputs.add(name=draw(names), datatype=draw(datatypes), shape=draw(shapes))
        for field in draw(st.sets(st.sampled_from(sorted(typed_values)), max_size=2)):
            getattr(tensor.contents, field).extend(draw(typed_values[field]))
    request.raw_input_contents.extend(draw(raw_contents))
    for _ in range(draw(st.integers(0, 2))):
        output = request.outputs.add(name=draw(st.sampled_from([OUTPUT_NAME, "probs", ""])))
        for key in draw(st.sets(st.sampled_from(["classification", "binary_data", "x"]), max_size=2)):
            kind, value = draw(parameter_values)
            setattr(output.parameters[key], kind, value)
    return request


def check_parse(request: pb.ModelInferRequest) -> None:
    """The property: a well-formed result, or a ServingError; nothing else."""
    try:
        inputs = parse_inputs(request, MODEL)
    except ServingError:
        pass
    else:
        assert inputs.dtype == np.float32 and inputs.shape[1:] == (1, 28, 28)
        assert 1 <= inputs.shape[0] <= MODEL.max_batch_size
    try:
        outputs = parse_outputs(request)
    except ServingError:
        return
    for output in outputs:
        assert output.name == OUTPUT_NAME and (output.classification is None or output.classification >= 1)


# --- request parsing -------------------------------------------------------------------------------


@FUZZ
@given(infer_requests())
def test_any_request_fields_parse_or_fail_cleanly(request: pb.ModelInferRequest) -> None:
    check_parse(request)


@FUZZ
@given(infer_requests(), st.lists(st.tuples(st.integers(0, 2**20), st.integers(1, 255)), min_size=1, max_size=4))
def test_corrupted_wire_bytes_parse_or_fail_cleanly(
    request: pb.ModelInferRequest, flips: list[tuple[int, int]]
) -> None:
    """Flipped bytes in a serialised request: whatever protobuf still accepts must parse or fail cleanly."""
    data = bytearray(request.SerializeToString())
    for position, mask in flips:
        if data:
            data[position % len(data)] ^= mask
    try:
        corrupted = pb.ModelInferRequest.FromString(bytes(data))
    except DecodeError:  # the server answers these INVALID_ARGUMENT before parsing (server/transport/interceptors.py)
        return
    check_parse(corrupted)


def test_the_fuzzer_reaches_the_success_path() -> None:
    """The strategies include well-formed requests, so the property also checks accepted ones."""
    request = pb.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[2, 1, 28, 28])
    tensor.contents.fp32_contents.extend([0.5] * (2 * 28 * 28))
    assert parse_inputs(request, MODEL).shape == (2, 1, 28, 28)
    request.outputs.add(name=OUTPUT_NAME).parameters["classification"].string_param = " 3 "
    assert parse_outputs(request)[0].classification == 3


# --- HTTP/REST bodies (server/transport/rest_codec.py) ----------------------------------------------

surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
"""JSON's \\ud800 escapes decode to these lone surrogates, which protobuf strings cannot hold."""
json_text = st.text(max_size=6) | st.text(surrogates, min_size=1, max_size=2) | tricky_numbers
edge_integers = st.sampled_from([-1, 255, 256, -129, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1])
"""Just past what each integer datatype, int64_param and uint64_param hold."""
json_numbers = st.integers(-(2**70), 2**70) | st.floats() | edge_integers
json_values = st.recursive(
    st.none() | st.booleans() | json_numbers | json_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(json_text, children, max_size=4),
    max_leaves=12,
)
json_parameters = st.dictionaries(
    st.sampled_from(["binary_data", "binary_data_size", "binary_data_output", "classification", "priority"])
    | json_text,
    edge_integers | st.booleans() | json_numbers | json_text | json_values,
    max_size=3,
)
deeply_nested = st.integers(1, 3000).map(lambda depth: b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}")
"""Nesting no json.dumps can write: past the recursion limit the decoder raises RecursionError."""
BINARY_SIZE = "binary_data_size"


def rarely(draw: st.DrawFn) -> bool:
    """True one draw in ten: for the wild shapes of a field, so most examples get past it."""
    return draw(st.integers(0, 9)) == 0


@st.composite
def rest_tensors(draw: st.DrawFn) -> object:
    """Mostly plausible input tensors, each field wild one time in ten: JSON 'data' of every datatype (integers
    past its range included) or a binary_data_size."""
    if rarely(draw):
        return draw(json_values)
    tensor: dict[str, object] = {
        "name": draw(names | surrogates) if rarely(draw) else "input",
        "datatype": draw(datatypes if rarely(draw) else st.sampled_from([*DATATYPES, "BYTES", "FP16"])),
        "shape": draw(json_values if rarely(draw) else shapes),
    }
    parameters = draw(json_parameters) if rarely(draw) else {}
    binary = draw(st.booleans())
    if binary:
        parameters[BINARY_SIZE] = draw(
            st.sampled_from([0, ROW, 2 * ROW, ROW - 4, -1]) | st.integers(-(2**65), 2**65) | json_values
        )
    if parameters:
        tensor["parameters"] = parameters
    if not binary or rarely(draw):
        rows = st.integers(0, 2).map(lambda n: [0.5] * (28 * 28 * n))
        numbers = st.lists(json_numbers, min_size=1, max_size=4)
        tensor["data"] = draw(rows | st.just([[[[0.0] * 28] * 28]]) | numbers | numbers | json_values)
    return tensor


@st.composite
def rest_bodies(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """An infer body: a JSON header of inputs, outputs and parameters, then binary tensors of the declared
    sizes (mostly), the Inference-Header-Content-Length right (mostly), wrong or missing, and now and then
    a few bytes flipped."""
    inputs = draw(json_values) if rarely(draw) else draw(st.lists(rest_tensors(), min_size=1, max_size=2))
    document: dict[str, object] = {"inputs": inputs}
    if draw(st.booleans()):
        output_names = st.sampled_from([OUTPUT_NAME, "probs"]) | json_text
        document["outputs"] = [
            {"name": draw(output_names), "parameters": draw(json_parameters)} for _ in range(draw(st.integers(0, 2)))
        ]
    for field, values in (("parameters", json_parameters), ("id", json_text | json_values)):
        if draw(st.booleans()):
            document[field] = draw(values)
    header = json.dumps(document).encode()
    sizes = (
        [t.get("parameters", {}).get(BINARY_SIZE) for t in inputs if isinstance(t, dict)]
        if isinstance(inputs, list)
        else []
    )
    declared = sum(s for s in sizes if isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= 4 * ROW)
    tail = draw(st.binary(max_size=16)) if rarely(draw) else b"\0" * declared
    body = bytearray(header + tail)
    if rarely(draw):
        for position, mask in draw(st.lists(st.tuples(st.integers(0, 2**20), st.integers(1, 255)), max_size=3)):
            body[position % len(body)] ^= mask
    length = st.sampled_from(["0", "-1", "abc", " 3", "+3", "٣", ""]) | st.integers(0, len(body) + 2).map(str)
    header_length = draw(length) if rarely(draw) else (str(len(header)) if tail else None)
    return bytes(body), header_length


def check_rest_parse(body: bytes, header_length: str | None) -> None:
    """The property over HTTP: a request protobuf can serialise that kserve_codec then parses or refuses
    cleanly, or InvalidArgument (a 400); nothing else."""
    try:
        parsed = parse_infer_request(body, header_length, "digits", "")
    except InvalidArgument:
        return
    parsed.request.SerializeToString()
    assert all(isinstance(binary, bool) for binary in parsed.binary_outputs.values())
    check_parse(parsed.request)


@FUZZ
@given(rest_bodies())
def test_any_rest_infer_body_parses_or_fails_cleanly(body_and_header: tuple[bytes, str | None]) -> None:
    check_rest_parse(*body_and_header)


GOOD_INPUT = {"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.5] * (28 * 28)}


@FUZZ
@given(st.sampled_from([*DATATYPES, "BYTES", "FP16"]), st.lists(json_numbers, min_size=1, max_size=6))
def test_any_numbers_as_rest_data_parse_or_fail_cleanly(datatype: str, data: list[object]) -> None:
    """Focused on JSON 'data' (every datatype, integers just past each one's range, floats past float32's)."""
    tensor = {"name": "input", "shape": [len(data)], "datatype": datatype, "data": data}
    check_rest_parse(json.dumps({"inputs": [tensor]}).encode(), None)


@FUZZ
@given(json_parameters, json_parameters, json_parameters, st.sampled_from([OUTPUT_NAME, "probs"]) | json_text)
def test_any_rest_parameters_parse_or_fail_cleanly(
    request_parameters: dict[str, object],
    input_parameters: dict[str, object],
    output_parameters: dict[str, object],
    output: str,
) -> None:
    """Focused on parameters (request, input and output level) of an otherwise good request: each becomes an
    InferParameter or is refused."""
    tensor = {**GOOD_INPUT, "parameters": {k: v for k, v in input_parameters.items() if k != BINARY_SIZE}}
    document = {
        "inputs": [tensor],
        "outputs": [{"name": output, "parameters": output_parameters}],
        "parameters": request_parameters,
    }
    check_rest_parse(json.dumps(document).encode(), None)


@FUZZ
@given(st.binary(max_size=256) | deeply_nested, st.none() | st.integers(-2, 300).map(str))
def test_any_bytes_as_a_rest_infer_body_parse_or_fail_cleanly(body: bytes, header_length: str | None) -> None:
    check_rest_parse(body, header_length)


classify_documents = st.fixed_dictionaries(
    {},
    optional={
        "images": st.lists(st.sampled_from(["", "iVBORw0KGgo=", "%%%", "QQ"]) | json_values, max_size=3) | json_values,
        "top_k": json_values | tricky_numbers,
    },
)


@FUZZ
@given(
    classify_documents.map(lambda d: json.dumps(d).encode())
    | json_values.map(lambda d: json.dumps(d).encode())
    | deeply_nested
    | st.binary(max_size=64)
)
def test_any_rest_classify_body_parses_or_fails_cleanly(body: bytes) -> None:
    try:
        request = parse_classify_json(body, "digits", "")
    except InvalidArgument:
        return
    request.SerializeToString()
    assert request.top_k >= 0


def test_the_rest_fuzzer_reaches_the_success_path() -> None:
    """Both of a client's encodings parse, so the property also checks accepted REST requests."""
    tensor = {**GOOD_INPUT, "shape": [2, 1, 28, 28], "data": [0.5] * (2 * 28 * 28)}
    as_json = json.dumps({"inputs": [tensor], "outputs": [{"name": OUTPUT_NAME}]}).encode()
    assert parse_inputs(parse_infer_request(as_json, None, "digits", "").request, MODEL).shape == (2, 1, 28, 28)
    binary = {**tensor, "parameters": {BINARY_SIZE: 2 * ROW}}
    del binary["data"]
    header = json.dumps({"inputs": [binary], "parameters": {"binary_data_output": True}}).encode()
    parsed = parse_infer_request(header + b"\0" * 2 * ROW, str(len(header)), "digits", "")
    assert parse_inputs(parsed.request, MODEL).shape == (2, 1, 28, 28) and parsed.binary_by_default


# --- image decoding --------------------------------------------------------------------------------


def encoded(fmt: str, size: tuple[int, int], mode: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, fmt)
    return buffer.getvalue()


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid PNG or JPEG, then bytes flipped, cut, or spliced in: the decoder sees plausible headers."""
    fmt = draw(st.sampled_from(["PNG", "JPEG"]))
    mode = draw(st.sampled_from(["L", "RGB"] + (["RGBA", "P", "I;16"] if fmt == "PNG" else [])))
    size = (draw(st.integers(1, 48)), draw(st.integers(1, 48)))
    data = bytearray(encoded(fmt, size, mode, draw(st.integers(0, 3))))
    for _ in range(draw(st.integers(1, 6))):
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "cut", "splice"]))
        if action == "flip":
            data[position] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[position:]
            if not data:
                break
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


def check_decode(data: bytes) -> None:
    for preprocess, shape in ((GRAY, (1, 28, 28)), (RGB, (3, 32, 32))):
        try:
            pixels = preprocess(data)
        except ServingError:
            continue
        assert pixels.shape == shape and pixels.dtype == np.float32


@FUZZ
@given(st.binary(max_size=2048))
def test_any_bytes_decode_or_fail_cleanly(data: bytes) -> None:
    check_decode(data)


@FUZZ
@given(mutated_images())
def test_mutated_png_and_jpeg_decode_or_fail_cleanly(data: bytes) -> None:
    check_decode(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_unmutated_images_decode(fmt: str) -> None:
    check_decode(encoded(fmt, (30, 20), "RGB", 0))
    assert GRAY(encoded(fmt, (30, 20), "RGB", 0)).shape == (1, 28, 28)
