"""Bad input over ModelInfer, ModelStreamInfer and Classify, and over HTTP (KServe v2 REST: JSON, the binary
tensor extension, POST .../classify): the exact status, a clear message, and the server answers a good request
right after. (``test_errors.py`` has the stock-tritonclient cases.)

Also: requests whose deadline passes while queued get DEADLINE_EXCEEDED and never reach the model,
and a full queue answers RESOURCE_EXHAUSTED with a retry hint.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import http.client
import io
import json
import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import grpc
import numpy as np
import pytest
import tritonclient.http as triton_http
from google.protobuf.message import Message
from PIL import Image

from clients.client import CHANNEL_OPTIONS
from clients.codec import build_infer_request
from clients.loadgen import open_channel
from compression.models.digits.data import encode_png, load_splits, normalize
from compression.models.settings import PythonSource
from protos import classifier_pb2, classifier_pb2_grpc
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from server.config.settings import DeployConfig, ModelSettings, ServerSettings
from server.transport.kserve import STATUS_CODE_PARAMETER
from tests.conftest import digits_without_compression
from tests.serving import ServerThread, running_server, sample_value, scrape

MiB = 1024 * 1024
ROW = 28 * 28 * 4
"""Bytes of one FP32 digits image."""

Rpc = Literal["infer", "stream", "classify", "infer-bytes", "classify-bytes"]


def infer_request(
    shape: tuple[int, ...] = (1, 1, 28, 28),
    datatype: str = "FP32",
    raw: bytes | None = None,
    *,
    model: str = "digits",
    version: str = "",
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="input", datatype=datatype, shape=list(shape))
    request.raw_input_contents.append(b"\0" * ROW if raw is None else raw)
    return request


def with_change(request: pb.ModelInferRequest, change: str, value: object = None) -> pb.ModelInferRequest:
    """``request`` with one field changed (a name from the table below)."""
    if change == "extra input":
        request.inputs.add(name="mask", datatype="FP32", shape=[1, 1, 28, 28])
        request.raw_input_contents.append(b"\0" * ROW)
    elif change == "typed":
        getattr(request.inputs[0].contents, str(value)).extend([0] * (28 * 28))
    elif change == "no raw":
        del request.raw_input_contents[:]
    elif change == "second raw":
        request.raw_input_contents.append(b"\0" * ROW)
    elif change == "classification":
        parameter = request.outputs.add(name="logits").parameters["classification"]
        kind, setting = value  # type: ignore[misc]
        setattr(parameter, kind, setting)
    return request


def image(fmt: str, size: tuple[int, int] = (28, 28)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full(size[::-1], 128, np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims ``width`` x ``height`` (with a correct header checksum)."""
    data = bytearray(image("PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(image("JPEG"))
    frame = data.find(b"\xff\xc0")
    data[frame + 5 : frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def classify(*images: bytes, model: str = "digits", variant: str = "") -> classifier_pb2.ClassifyRequest:
    return classifier_pb2.ClassifyRequest(model_name=model, images=list(images), variant=variant)


JPEG = image("JPEG")
PNG = image("PNG")
BAD_UTF8_MODEL_NAME = b"\x0a\x04dig\xff"  # field 1 (model_name), 4 bytes, the last not UTF-8


@dataclass(frozen=True)
class Case:
    name: str
    rpc: Rpc
    request: Message | bytes
    code: grpc.StatusCode
    fragment: str


INVALID, NOT_FOUND, EXHAUSTED = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)

CASES = [
    # --- ModelInfer: tensors ---------------------------------------------------------------------
    Case("no inputs", "infer", pb.ModelInferRequest(model_name="digits"), INVALID, "exactly one input named 'input'"),
    Case("extra unknown input", "infer", with_change(infer_request(), "extra input"), INVALID, "['input', 'mask']"),
    Case("batch 0", "infer", infer_request((0, 1, 28, 28), raw=b""), INVALID, "batch size 0 is outside 1..32"),
    Case("negative batch", "infer", infer_request((-1, 1, 28, 28)), INVALID, "batch size -1 is outside 1..32"),
    Case("huge batch", "infer", infer_request((2**40, 1, 28, 28)), INVALID, f"batch size {2**40} is outside"),
    Case("huge dimension", "infer", infer_request((1, 1, 28, 2**31)), INVALID, "expected [-1, 1, 28, 28]"),
    Case("negative dimension", "infer", infer_request((1, 1, -28, 28)), INVALID, "shape [1, 1, -28, 28]"),
    Case("rank 5", "infer", infer_request((1, 1, 1, 28, 28)), INVALID, "shape [1, 1, 1, 28, 28], expected"),
    Case("FP16", "infer", infer_request(datatype="FP16", raw=b"\0" * (ROW // 2)), INVALID, "must be FP32"),
    Case("BYTES", "infer", infer_request(datatype="BYTES"), INVALID, "got datatype 'BYTES'"),
    Case("unknown datatype", "infer", infer_request(datatype="FLOAT32"), INVALID, "got datatype 'FLOAT32'"),
    Case("empty datatype", "infer", infer_request(datatype=""), INVALID, "got datatype ''"),
    Case("raw too long", "infer", infer_request(raw=b"\0" * (ROW + 4)), INVALID, f"{ROW + 4} bytes of raw"),
    Case("raw entry empty", "infer", infer_request(raw=b""), INVALID, "0 bytes of raw contents, but shape"),
    Case("two raw entries", "infer", with_change(infer_request(), "second raw"), INVALID, "2 raw_input_contents"),
    Case(
        "raw and typed contents",
        "infer",
        with_change(infer_request(), "typed", "fp32_contents"),
        INVALID,
        "both raw_input_contents and contents.fp32_contents",
    ),
    Case(
        "typed contents of another type",
        "infer",
        with_change(with_change(infer_request(), "no raw"), "typed", "int_contents"),
        INVALID,
        "is FP32: send its values in contents.fp32_contents only, got ['contents.int_contents']",
    ),
    Case("no data", "infer", with_change(infer_request(), "no raw"), INVALID, "has no data: send raw_input_contents"),
    # --- ModelInfer: model, version, outputs -----------------------------------------------------
    Case("empty model name", "infer", infer_request(model=""), NOT_FOUND, "unknown model ''; this server serves"),
    Case("unknown version name", "infer", infer_request(version="latest"), NOT_FOUND, "no version 'latest'"),
    Case(
        "classification 0",
        "infer",
        with_change(infer_request(), "classification", ("int64_param", 0)),
        INVALID,
        "'classification' must be a positive integer (the top-k), got 0",
    ),
    Case(
        "classification negative string",
        "infer",
        with_change(infer_request(), "classification", ("string_param", "-3")),
        INVALID,
        "got -3",
    ),
    Case(
        "classification bool",
        "infer",
        with_change(infer_request(), "classification", ("bool_param", True)),
        INVALID,
        "got True",
    ),
    Case(
        "classification double",
        "infer",
        with_change(infer_request(), "classification", ("double_param", 2.5)),
        INVALID,
        "got 2.5",
    ),
    Case(
        "classification overlong number",
        "infer",
        with_change(infer_request(), "classification", ("string_param", "9" * 5000)),
        INVALID,
        "got '9999",
    ),
    # --- ModelInfer: the message itself ----------------------------------------------------------
    Case("invalid UTF-8 model name", "infer-bytes", BAD_UTF8_MODEL_NAME, INVALID, "String field had bad UTF-8"),
    Case("not a protobuf", "infer-bytes", b"\xff\xff\xff\xff not protobuf", INVALID, "malformed"),
    Case("oversize message", "infer", infer_request((8, 1, 28, 28), raw=b"\0" * 5 * MiB), EXHAUSTED, "larger than max"),
    # --- ModelStreamInfer: errors come back on the stream, which goes on ----------------------------
    Case("stream: wrong shape", "stream", infer_request((1, 3, 28, 28)), INVALID, "expected [-1, 1, 28, 28]"),
    Case("stream: unknown model", "stream", infer_request(model="nope"), NOT_FOUND, "unknown model 'nope'"),
    Case("stream: byte length", "stream", infer_request(raw=b"\0" * 10), INVALID, "10 bytes of raw contents"),
    Case("stream: unknown version", "stream", infer_request(version="9"), NOT_FOUND, "no version '9'"),
    Case("stream: batch 0", "stream", infer_request((0, 1, 28, 28), raw=b""), INVALID, "batch size 0"),
    Case(
        "stream: classification",
        "stream",
        with_change(infer_request(), "classification", ("string_param", "all")),
        INVALID,
        "got 'all'",
    ),
    # --- Classify --------------------------------------------------------------------------------
    Case("GIF", "classify", classify(image("GIF")), INVALID, "image 0 is a GIF image; this server accepts JPEG, PNG"),
    Case("TIFF", "classify", classify(image("TIFF")), INVALID, "image 0 is a TIFF image; this server accepts"),
    Case("BMP", "classify", classify(image("BMP")), INVALID, "image 0 is a BMP image"),
    Case("WEBP", "classify", classify(image("WEBP")), INVALID, "image 0 is a WEBP image"),
    Case(
        "PNG claiming 100000x100000", "classify", classify(png_claiming(100_000, 100_000)), INVALID, "more pixels than"
    ),
    Case("JPEG claiming 65000x65000", "classify", classify(jpeg_claiming(65_000, 65_000)), INVALID, "more pixels"),
    Case("PNG of 7000x7000", "classify", classify(image("PNG", (7000, 7000))), INVALID, "49000000 pixels, more than"),
    Case("1 x 100000 strip", "classify", classify(image("PNG", (100_000, 1))), INVALID, "resized to a shorter side"),
    Case("PNG claiming 0x0", "classify", classify(png_claiming(0, 0)), INVALID, "image 0 is a corrupt PNG image"),
    Case("PNG signature only", "classify", classify(PNG[:8]), INVALID, "image 0 is a corrupt PNG image (8 bytes)"),
    Case("truncated JPEG", "classify", classify(JPEG[: len(JPEG) // 2]), INVALID, "image 0 cannot be decoded"),
    Case("JPEG header, garbage", "classify", classify(JPEG[:20] + bytes(range(256))), INVALID, "corrupt JPEG image"),
    Case("second image bad", "classify", classify(PNG, b"junk"), INVALID, "image 1 is not a JPEG or PNG image"),
    Case("empty model name", "classify", classify(PNG, model=""), NOT_FOUND, "unknown model ''"),
    Case("oversize request", "classify", classify(*[b"\0" * MiB] * 5), EXHAUSTED, "larger than max"),
    Case("invalid UTF-8 model name", "classify-bytes", BAD_UTF8_MODEL_NAME, INVALID, "String field had bad UTF-8"),
]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    """Digits with the smallest message limit allowed (4 MiB), so oversize messages are cheap to send."""
    config = digits_without_compression()
    limited = ServerSettings.model_validate({**config.server.model_dump(), "max_message_bytes": 4 * MiB})
    with running_server(config.model_copy(update={"server": limited})) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> grpc.Channel:
    return grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS)


def error_of(channel: grpc.Channel, case: Case) -> tuple[grpc.StatusCode, str]:
    """The status and message the server answered ``case`` with."""
    kserve, classifier = pb_grpc.GRPCInferenceServiceStub(channel), classifier_pb2_grpc.ClassifierStub(channel)
    raw_method = {
        "infer-bytes": "/inference.GRPCInferenceService/ModelInfer",
        "classify-bytes": "/slimserve.v1.Classifier/Classify",
    }
    try:
        if case.rpc == "stream":
            return stream_error(kserve, case.request)  # type: ignore[arg-type]
        if case.rpc in raw_method:
            channel.unary_unary(raw_method[case.rpc])(case.request, timeout=20)
        else:
            call = kserve.ModelInfer if case.rpc == "infer" else classifier.Classify
            call(case.request, timeout=20)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    raise AssertionError(f"{case.name}: the server accepted it")


def stream_error(kserve: pb_grpc.GRPCInferenceServiceStub, bad: pb.ModelInferRequest) -> tuple[grpc.StatusCode, str]:
    """Send ``bad`` then a good request on one stream: the bad one's error, after checking the good one's answer."""
    bad.id, good = "bad", infer_request()
    good.id = "good"
    responses = {r.infer_response.id: r for r in kserve.ModelStreamInfer(iter([bad, good]), timeout=20)}
    assert set(responses) == {"bad", "good"} and not responses["good"].error_message
    failed = responses["bad"]
    code = failed.infer_response.parameters[STATUS_CODE_PARAMETER].string_param
    return grpc.StatusCode[code], failed.error_message


def assert_still_serving(channel: grpc.Channel) -> None:
    split = load_splits()["test"]
    request = build_infer_request("digits", "input", normalize(split.images[:1]), datatype="FP32")
    response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=20)
    assert np.frombuffer(response.raw_output_contents[0], np.float32).argmax() == split.labels[0]
    answer = classifier_pb2_grpc.ClassifierStub(channel).Classify(classify(encode_png(split.images[0])), timeout=20)
    assert answer.results[0].classes[0].index == split.labels[0]


def test_the_table_is_big_and_distinct() -> None:
    assert len(CASES) >= 30 and len({(c.rpc.split("-")[0], c.name) for c in CASES}) == len(CASES)
    assert {c.rpc.split("-")[0] for c in CASES} == {"infer", "stream", "classify"}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.rpc}: {c.name}")
def test_bad_input_gets_its_status_and_a_clear_message(channel: grpc.Channel, case: Case) -> None:
    code, message = error_of(channel, case)
    assert code == case.code, (case.name, code, message)
    assert case.fragment in message, message
    assert_still_serving(channel)


def test_malformed_message_ends_a_stream_with_invalid_argument(channel: grpc.Channel) -> None:
    """A message that does not parse cannot be answered on the stream (it has no id): the call ends with
    INVALID_ARGUMENT at once, instead of hanging until its deadline."""
    stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
    with pytest.raises(grpc.RpcError) as info:
        list(stream(iter([BAD_UTF8_MODEL_NAME]), timeout=20))
    assert info.value.code() == INVALID and "bad UTF-8" in info.value.details()
    assert_still_serving(channel)


# --- deadlines and the queue limit, on a model slow enough to queue behind ----------------------------


SLOW_S = 0.5


def sleepy_config(max_queue_size: int) -> DeployConfig:
    """A model that takes SLOW_S per forward pass, one request per batch, a short queue."""
    base = digits_without_compression().models[0]
    model = ModelSettings.model_validate(
        {
            **base.model_dump(exclude={"source", "compression", "batching"}),
            "name": "sleepy",
            "source": PythonSource(format="python", factory="tests.models:SleepyNet", kwargs={"delay_s": SLOW_S}),
            "batching": {"max_batch_size": 1, "max_queue_size": max_queue_size},
        }
    )
    return DeployConfig(models=[model])


@pytest.fixture(scope="module")
def sleepy() -> Iterator[ServerThread]:
    with running_server(sleepy_config(max_queue_size=4)) as running:
        yield running


async def call_sleepy(address: str, timeouts: list[float], stagger_s: float = 0.0) -> list[grpc.aio.AioRpcError | None]:
    """One ModelInfer per timeout, started ``stagger_s`` apart; None for a success, else the error."""
    request = infer_request(model="sleepy")
    async with open_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def one(index: int, timeout: float) -> grpc.aio.AioRpcError | None:
            await asyncio.sleep(index * stagger_s)
            try:
                await stub.ModelInfer(request, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                return exc
            return None

        return await asyncio.gather(*(one(i, t) for i, t in enumerate(timeouts)))


def inferred_rows(server: ServerThread) -> float:
    metrics = scrape(server)
    return sample_value(metrics["slimserve_inferences"], "slimserve_inferences_total", model="sleepy")


def test_expired_requests_get_deadline_exceeded_and_never_reach_the_model(sleepy: ServerThread) -> None:
    before = inferred_rows(sleepy)
    # the first holds the model for SLOW_S; the next three expire in the queue behind it
    outcomes = asyncio.run(call_sleepy(sleepy.address, [10, 0.2, 0.2, 0.2], stagger_s=0.05))
    assert outcomes[0] is None
    assert [e.code() if e else None for e in outcomes[1:]] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 3
    asyncio.run(asyncio.sleep(SLOW_S))  # anything wrongly left in the queue would run by now
    assert inferred_rows(sleepy) - before == 1  # only the first request's row was computed
    requests = scrape(sleepy)["slimserve_requests"]
    assert sample_value(requests, "slimserve_requests_total", model="sleepy", code="DEADLINE_EXCEEDED") == 3
    assert asyncio.run(call_sleepy(sleepy.address, [10])) == [None]


def test_full_queue_is_resource_exhausted_with_a_retry_hint(sleepy: ServerThread) -> None:
    """Queue of 4 and one running: of 10 at once, at most 5 are accepted; the rest are told to retry."""
    outcomes = asyncio.run(call_sleepy(sleepy.address, [30] * 10))
    codes = Counter(e.code() if e else grpc.StatusCode.OK for e in outcomes)
    assert set(codes) == {grpc.StatusCode.OK, EXHAUSTED} and 4 <= codes[grpc.StatusCode.OK] <= 5, codes
    refusal = next(e for e in outcomes if e is not None)
    assert "inference queue is full (4 requests waiting); retry after a short backoff" in refusal.details()
    assert asyncio.run(call_sleepy(sleepy.address, [10])) == [None]


# --- the same over HTTP: KServe v2 REST (server/transport/rest.py) -------------------------------------

INFER_PATH, CLASSIFY_PATH = "/v2/models/digits/infer", "/v2/models/digits/classify"
BOUNDARY = "slimserve-bad-input"
MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class RestCase:
    name: str
    method: str
    path: str
    body: bytes | tuple[bytes, ...] | None
    """A tuple is sent with chunked transfer encoding (no Content-Length), one chunk per item."""
    headers: dict[str, str]
    status: int
    fragment: str


def binary_infer(
    shape: tuple[int, ...] = (1, 1, 28, 28),
    datatype: str = "FP32",
    raw: bytes | None = None,
    *,
    declared: object = None,
    header_length: str | None = None,
    **document: object,
) -> tuple[bytes, dict[str, str]]:
    """An infer body with the input in Triton's binary extension (as tritonclient.http sends it) and its
    Inference-Header-Content-Length header; ``declared`` overrides binary_data_size, ``document`` adds
    top-level fields."""
    raw = b"\0" * ROW if raw is None else raw
    size = len(raw) if declared is None else declared
    tensor = {"name": "input", "shape": list(shape), "datatype": datatype, "parameters": {"binary_data_size": size}}
    header = json.dumps({"inputs": [tensor], **document}).encode()
    return header + raw, {"Inference-Header-Content-Length": header_length or str(len(header))}


def json_infer(data: object = None, datatype: str = "FP32", shape: object = (1, 1, 28, 28), **fields: object) -> bytes:
    """An infer body with the input as JSON ``data`` (784 zeros unless given); ``fields`` go in the tensor."""
    tensor = {"name": "input", "shape": list(shape) if isinstance(shape, tuple) else shape, "datatype": datatype}
    tensor["data"] = [0.0] * (28 * 28) if data is None else data
    tensor.update(fields)
    return json.dumps({"inputs": [tensor]}).encode()


def with_output(output_parameters: dict[str, object], name: str = "logits", **document: object) -> bytes:
    """A good JSON infer body asking for output ``name`` with ``output_parameters``; ``document`` adds fields."""
    tensor = {"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * (28 * 28)}
    output = {"name": name, "parameters": output_parameters}
    return json.dumps({"inputs": [tensor], "outputs": [output], **document}).encode()


def multipart(*images: bytes, top_k: str | None = None) -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="{i}.img"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
        for i, data in enumerate(images)
    ]
    if top_k is not None:
        parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n{top_k}\r\n'.encode())
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def base64_images(*images: bytes, **document: object) -> bytes:
    return json.dumps({"images": [base64.b64encode(i).decode() for i in images], **document}).encode()


TWO_INPUTS = json.dumps(
    {
        "inputs": [
            {"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * (28 * 28)},
            {"name": "mask", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * (28 * 28)},
        ]
    }
).encode()
NESTED_MULTIPART = (
    (
        f"--{BOUNDARY}\r\nContent-Type: multipart/mixed; boundary=inner\r\n\r\n"
        f"--inner\r\nContent-Type: image/png\r\n\r\n"
    ).encode()
    + PNG
    + f"\r\n--inner--\r\n--{BOUNDARY}--\r\n".encode()
)
OVERSIZE_JSON = b'{"inputs": [' + b" " * 5 * MiB + b"]}"
GZIP_BOMB = gzip.compress(b'{"inputs": [' + b" " * 16 * MiB + b"]}")
GZIP = {"Content-Encoding": "gzip"}


def rest(
    name: str,
    body: bytes | tuple[bytes, ...] | None,
    status: int,
    fragment: str,
    *,
    path: str = INFER_PATH,
    method: str | None = None,
    headers: dict[str, str] | None = None,
) -> RestCase:
    """A bad request to .../infer unless said otherwise: POST with a body, GET without."""
    method = method or ("POST" if body is not None else "GET")
    return RestCase(name, method, path, body, headers or {}, status, fragment)


def rest_binary(name: str, status: int, fragment: str, *args: object, **kwargs: object) -> RestCase:
    body, headers = binary_infer(*args, **kwargs)  # type: ignore[arg-type]
    return RestCase(name, "POST", INFER_PATH, body, headers, status, fragment)


def rest_classify(name: str, body: bytes, status: int, fragment: str, headers: dict[str, str] = MULTIPART) -> RestCase:
    return RestCase(name, "POST", CLASSIFY_PATH, body, headers, status, fragment)


REST_CASES = [
    # --- infer: the JSON document --------------------------------------------------------------------
    rest("malformed JSON", b"{not json", 400, "the inference request is not valid JSON"),
    rest("empty body", b"", 400, "the inference request is not valid JSON"),
    rest("not UTF-8", b'{"inputs": "\xff"}', 400, "is not valid JSON: 'utf-8' codec can't decode"),
    rest("JSON array", b"[1, 2]", 400, "the inference request must be a JSON object, got [1, 2]"),
    rest("nested too deeply", b"[" * 100_000, 400, "the inference request is nested too deeply to parse"),
    rest("no inputs", b'{"inputs": []}', 400, "needs a non-empty 'inputs' list"),
    rest("input not an object", b'{"inputs": [7]}', 400, "input 0 must be a JSON object, got 7"),
    rest("id not a string", json_infer()[:-1] + b', "id": 7}', 400, "the request 'id' must be a string, got 7"),
    rest("lone surrogate in id", json_infer()[:-1] + b', "id": "\\ud800"}', 400, "'id' is not valid Unicode"),
    rest("two inputs", TWO_INPUTS, 400, "takes exactly one input named 'input', got ['input', 'mask']"),
    # --- infer: shape and datatype ---------------------------------------------------------------------
    rest_binary("wrong shape", 400, "has shape [1, 1, 27, 28], expected [-1, 1, 28, 28]", (1, 1, 27, 28)),
    rest_binary("rank 5", 400, "shape [1, 1, 1, 28, 28], expected", (1, 1, 1, 28, 28)),
    rest_binary("batch 0", 400, "batch size 0 is outside 1..32", (0, 1, 28, 28), raw=b""),
    rest_binary("huge batch", 400, f"batch size {2**40} is outside", (2**40, 1, 28, 28)),
    rest("shape beyond int64", json_infer(shape=[2**70, 1, 28, 28]), 400, f"'shape' [{2**70}, 1, 28, 28] is out"),
    rest("shape not integers", json_infer(shape=[1, "1", 28, 28]), 400, "'shape' must be a list of integers"),
    rest("shape of floats", json_infer(shape=[1.0, 1, 28, 28]), 400, "'shape' must be a list of integers"),
    rest_binary("FP16 binary", 400, "must be FP32, got datatype 'FP16'", datatype="FP16", raw=b"\0" * (ROW // 2)),
    rest("FP16 as JSON data", json_infer(datatype="FP16"), 400, "datatype 'FP16' cannot be sent as JSON 'data'"),
    rest("BYTES as JSON data", json_infer(["a"], "BYTES", (1,)), 400, "'BYTES' cannot be sent as JSON 'data'"),
    rest("unknown datatype", json_infer(datatype="FLOAT32"), 400, "input 'input': unknown datatype 'FLOAT32'"),
    rest("INT32 data", json_infer([0] * (28 * 28), "INT32"), 400, "must be FP32, got datatype 'INT32'"),
    rest("INT32 out of range", json_infer([2**40] * 3, "INT32"), 400, "not a (nested) list of INT32 numbers"),
    rest("UINT8 negative", json_infer([-1], "UINT8"), 400, "Python integer -1 out of bounds for uint8"),
    # --- infer: JSON data --------------------------------------------------------------------------------
    rest("data not numbers", json_infer(["zero"] * 3), 400, "'data' is not a (nested) list of FP32 numbers"),
    rest("ragged data", json_infer([[0.0], [0.0, 0.0]]), 400, "'data' is not a (nested) list of FP32 numbers"),
    rest("too few values", json_infer([0.0] * 10), 400, "10 values"),
    rest(
        "no data",
        b'{"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32"}]}',
        400,
        "has no data: send 'data' or binary data with binary_data_size",
    ),
    rest(
        "data and binary_data_size",
        json_infer(parameters={"binary_data_size": ROW}),
        400,
        "has both 'data' and binary_data_size: send its data once",
    ),
    # --- infer: the binary extension --------------------------------------------------------------------
    rest_binary("binary size short of the data", 400, f"{ROW} bytes of binary data follow", declared=ROW - 4),
    rest_binary("binary size past the body", 400, f"binary_data_size is {ROW + 4}, but only {ROW}", declared=ROW + 4),
    rest_binary("negative binary_data_size", 400, "binary_data_size must be an integer >= 0, got -4", declared=-4),
    rest_binary("binary_data_size a string", 400, f"must be an integer >= 0, got '{ROW}'", declared=str(ROW)),
    rest_binary("binary_data_size a float", 400, "must be an integer >= 0, got 3136.0", declared=float(ROW)),
    rest_binary("binary longer than the shape", 400, f"{ROW + 4} bytes of raw", raw=b"\0" * (ROW + 4)),
    rest_binary(
        "binary and no JSON",
        400,
        "Inference-Header-Content-Length is 1000000, but the body has",
        header_length="1000000",
    ),
    rest_binary(
        "header length not a number",
        400,
        "Inference-Header-Content-Length must be an integer, got 'abc'",
        header_length="abc",
    ),
    rest_binary("header length with a sign", 400, "must be an integer, got '+12'", header_length="+12"),
    rest_binary("header length 0", 400, "Inference-Header-Content-Length is 0, but", header_length="0"),
    rest_binary("header length cuts the JSON", 400, "the inference request is not valid JSON", header_length="12"),
    # --- infer: outputs and parameters ---------------------------------------------------------------------
    rest("unknown output", with_output({}, name="probs"), 400, "unknown output 'probs'; this model has 'logits'"),
    rest("classification 0", with_output({"classification": 0}), 400, "(the top-k), got 0"),
    rest("classification a word", with_output({"classification": "all"}), 400, "(the top-k), got 'all'"),
    rest("classification an object", with_output({"classification": {"k": 3}}), 400, "(the top-k), got '{"),
    rest("binary_data not a bool", with_output({"binary_data": 1}), 400, "output 'logits' binary must be true or"),
    rest("parameter past 64 bits", with_output({}, parameters={"p": 2**70}), 400, "'p' is out of the 64-bit range"),
    rest("parameter a list", with_output({}, parameters={"p": [1]}), 400, "must be a boolean, number or string"),
    rest("outputs not a list", with_output({}, outputs={}), 400, "'outputs' must be a list"),
    # --- infer: model, body size and encoding ----------------------------------------------------------------
    rest("unknown model", b"{}", 404, "unknown model 'nope'; this server serves: digits", path="/v2/models/nope/infer"),
    rest("unknown version", b"{}", 404, "has no version '9'", path="/v2/models/digits/versions/9/infer"),
    rest("model name not UTF-8", b"{}", 404, "unknown model '%FF'", path="/v2/models/%FF/infer"),
    rest("oversize body", OVERSIZE_JSON, 413, "request body exceeds the limit of 4194304 bytes"),
    rest("oversize chunked body", (OVERSIZE_JSON[: 3 * MiB], OVERSIZE_JSON[3 * MiB :]), 413, "exceeds the limit"),
    rest("gzip past the limit", GZIP_BOMB, 413, "exceeds the limit of 4194304 bytes", headers=GZIP),
    rest(
        "corrupt gzip", b"not gzip", 400, "cannot read the request body: Can not decode content-encoding", headers=GZIP
    ),
    # --- routes and methods ---------------------------------------------------------------------------------
    rest("unknown route", None, 404, "Not Found: GET /v2/nowhere", path="/v2/nowhere"),
    rest("GET infer", None, 405, "Method Not Allowed: GET /v2/models/digits/infer"),
    rest("DELETE a model", None, 405, "Method Not Allowed: DELETE", method="DELETE", path="/v2/models/digits"),
    rest("GET the repository index", None, 405, "Method Not Allowed", path="/v2/repository/index"),
    rest("metadata of an unknown version", None, 404, "has no version '9'", path="/v2/models/digits/versions/9"),
    rest("statistics of an unknown model", None, 404, "unknown model 'nope'", path="/v2/models/nope/stats"),
    rest("config of an unknown model", None, 404, "unknown model 'nope'", path="/v2/models/nope/config"),
    # --- classify -------------------------------------------------------------------------------------------
    rest_classify("GIF", multipart(image("GIF")), 400, "image 0 is a GIF image; this server accepts JPEG, PNG"),
    rest_classify("WEBP as base64", base64_images(image("WEBP")), 400, "image 0 is a WEBP image", JSON),
    rest_classify("corrupt PNG", multipart(png_claiming(0, 0)), 400, "image 0 is a corrupt PNG image"),
    rest_classify("PNG signature only", base64_images(PNG[:8]), 400, "corrupt PNG image (8 bytes)", JSON),
    rest_classify("truncated JPEG", multipart(JPEG[: len(JPEG) // 2]), 400, "image 0 cannot be decoded"),
    rest_classify("second image bad", multipart(PNG, b"junk"), 400, "image 1 is not a JPEG or PNG image"),
    rest_classify("PNG claiming 100000x100000", multipart(png_claiming(100_000, 100_000)), 400, "more pixels than"),
    rest_classify("too many images", multipart(*[PNG] * 65), 400, "more than 64 images in one request; the limit"),
    rest_classify("too many base64 images", base64_images(*[PNG] * 65), 400, "65 images in one request", JSON),
    rest_classify("no images", multipart(top_k="1"), 400, "no images in the request"),
    rest_classify("no base64 images", base64_images(), 400, "no images in the request", JSON),
    rest_classify("images not a list", b'{"images": "abc"}', 400, "needs 'images': a list of base64", JSON),
    rest_classify("not base64", b'{"images": ["%%%"]}', 400, "images[0] is not valid base64", JSON),
    rest_classify("top_k negative", multipart(PNG, top_k="-1"), 400, "top_k must be an integer >= 0"),
    rest_classify("top_k a word", base64_images(PNG, top_k="three"), 400, "(0 = the server default), got 'thr", JSON),
    rest_classify(
        "unsupported content type", b"abc", 400, "unsupported Content-Type 'text/plain'", {"Content-Type": "text/plain"}
    ),
    rest_classify(
        "multipart without boundary",
        b"abc",
        400,
        "malformed multipart body: boundary missed",
        {"Content-Type": "multipart/form-data"},
    ),
    rest_classify("multipart garbage", b"garbage", 400, "malformed multipart body: Could not find starting"),
    rest_classify("nested multipart", NESTED_MULTIPART, 400, "nested multipart bodies are not supported"),
    rest_classify("one part past the limit", multipart(b"\0" * 5 * MiB), 413, "exceeds the limit of 4194304 bytes"),
    rest_classify("parts adding up past the limit", multipart(*[b"\0" * MiB] * 5), 413, "exceeds the limit"),
    RestCase("unknown model", "POST", "/v2/models/nope/classify", multipart(PNG), MULTIPART, 404, "unknown model"),
]


def http_call(server: ServerThread, case: RestCase) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(*server.http_address.split(":"), timeout=30)
    try:
        chunked = isinstance(case.body, tuple)
        body = iter(case.body) if isinstance(case.body, tuple) else case.body
        connection.request(case.method, case.path, body=body, headers=case.headers, encode_chunked=chunked)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def assert_still_serving_http(server: ServerThread) -> None:
    """A good infer (binary, as tritonclient.http sends it) and a good multipart classify over HTTP."""
    split = load_splits()["test"]
    pixels = normalize(split.images[:1]).astype(np.float32).tobytes()
    body, headers = binary_infer(raw=pixels, parameters={"binary_data_output": False})
    status, answer = http_call(server, RestCase("good", "POST", INFER_PATH, body, headers, 200, ""))
    assert status == 200, answer
    assert np.argmax(json.loads(answer)["outputs"][0]["data"]) == split.labels[0]
    good = RestCase("good", "POST", CLASSIFY_PATH, multipart(encode_png(split.images[0])), MULTIPART, 200, "")
    status, answer = http_call(server, good)
    assert status == 200, answer
    assert json.loads(answer)["results"][0]["classes"][0]["index"] == split.labels[0]


def test_the_rest_table_is_big_and_distinct() -> None:
    assert len(REST_CASES) >= 50 and len({(c.path, c.name) for c in REST_CASES}) == len(REST_CASES)
    assert {c.path for c in REST_CASES} >= {INFER_PATH, CLASSIFY_PATH}


@pytest.mark.parametrize("case", REST_CASES, ids=lambda c: f"{c.path.rsplit('/', 1)[-1]}: {c.name}")
def test_bad_http_input_gets_its_status_and_a_clear_message(server: ServerThread, case: RestCase) -> None:
    status, answer = http_call(server, case)
    assert status == case.status, (case.name, status, answer[:500])
    message = json.loads(answer)["error"]
    assert case.fragment in message, message
    assert_still_serving_http(server)


def test_nan_over_json_is_served_as_grpc_serves_it(server: ServerThread, channel: grpc.Channel) -> None:
    """JSON has no NaN, but tritonclient.http writes Python's NaN literal for it, so the endpoint reads it,
    as gRPC takes NaN floats: the model runs, its logits are NaN, and the answer writes them back the same way."""
    nan = np.full((1, 1, 28, 28), np.nan, np.float32)
    client = triton_http.InferenceServerClient(server.http_address)
    tensor = triton_http.InferInput("input", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(nan, binary_data=False)
    over_http = client.infer("digits", [tensor], outputs=[triton_http.InferRequestedOutput("logits", False)])
    logits = over_http.as_numpy("logits")
    assert logits is not None and logits.shape == (1, 10) and np.isnan(logits).all()
    response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(raw=nan.tobytes()), timeout=20)
    assert np.isnan(np.frombuffer(response.raw_output_contents[0], np.float32)).all()
    assert_still_serving_http(server)
