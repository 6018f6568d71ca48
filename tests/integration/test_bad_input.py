"""Bad input over ModelInfer, ModelStreamInfer and Classify: the exact status, a clear message, and the
server answers a good request right after. (``test_errors.py`` has the stock-tritonclient cases.)

Also: requests whose deadline passes while queued get DEADLINE_EXCEEDED and never reach the model,
and a full queue answers RESOURCE_EXHAUSTED with a retry hint.
"""

from __future__ import annotations

import asyncio
import io
import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import grpc
import numpy as np
import pytest
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
