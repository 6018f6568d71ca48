"""Property-based fuzzing of what a client controls: ModelInfer fields and encoded image bytes.

Whatever arrives, parsing either succeeds with a well-formed result or raises a ``ServingError`` (a clean
gRPC status for the caller); any other exception would reach the caller as INTERNAL and is a bug.
"""

from __future__ import annotations

import io

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
from protos.errors import ServingError
from protos.tensors import DATATYPES
from server.config.settings import default_config
from server.transport.kserve_codec import parse_inputs, parse_outputs
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
