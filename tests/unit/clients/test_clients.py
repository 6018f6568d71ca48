"""The client library, load generator and CLI, without a server (no sockets are opened)."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from clients import cli
from clients.client import SlimserveClient, auth_metadata
from clients.codec import build_infer_request, datatype_of, decode_array, encode_array, output_array
from clients.loadgen import LoadResult, run_load
from protos import classifier_pb2
from protos import grpc_service_pb2 as pb

NUMERIC = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}

# ---------------------------------------------------------------------------
# codec
# ---------------------------------------------------------------------------


def _response(datatype: str, shape: list[int], raw: bytes) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name="m")
    response.outputs.add(name="out", datatype=datatype, shape=shape)
    response.raw_output_contents.append(raw)
    return response


@pytest.mark.parametrize("datatype", sorted(NUMERIC))
def test_output_of_each_numeric_datatype(datatype: str) -> None:
    dtype = np.dtype(NUMERIC[datatype])
    expected = (np.arange(-3, 3) % 7).astype(dtype).reshape(2, 3)
    # NOTE: built by hand, little-endian, as the wire defines it.
    raw = expected.astype(dtype.newbyteorder("<")).tobytes()
    got = output_array(_response(datatype, [2, 3], raw))
    assert got.shape == (2, 3)
    assert got.dtype.newbyteorder("=") == dtype
    np.testing.assert_array_equal(got, expected)
    assert datatype_of(expected) == datatype
    assert encode_array(expected, datatype) == raw


def test_output_bytes_tensor() -> None:
    raw = b"\x03\x00\x00\x00abc" + b"\x00\x00\x00\x00" + b"\x02\x00\x00\x00\xff\x00" + b"\x01\x00\x00\x00z"
    got = output_array(_response("BYTES", [2, 2], raw))
    assert got.dtype == object and got.shape == (2, 2)
    assert got.tolist() == [[b"abc", b""], [b"\xff\x00", b"z"]]
    assert encode_array(np.array([[b"abc", ""], [b"\xff\x00", "z"]], dtype=object), "BYTES") == raw


def test_output_bf16_becomes_float32() -> None:
    values = np.array([1.0, -2.5, 0.15625], dtype=np.float32)  # exact in bfloat16
    raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    got = output_array(_response("BF16", [3], raw))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, values)


@pytest.mark.parametrize(
    ("datatype", "shape", "raw"),
    [
        ("FP32", [2, 3], b"\x00" * 20),  # 24 bytes needed
        ("BYTES", [3], b"\x01\x00\x00\x00a"),  # 1 element for 3
        ("BYTES", [1], b"\x05\x00\x00\x00ab"),  # truncated element
        ("COMPLEX64", [1], b"\x00" * 8),
    ],
)
def test_malformed_outputs_raise_value_error(datatype: str, shape: list[int], raw: bytes) -> None:
    with pytest.raises(ValueError):
        output_array(_response(datatype, shape, raw))


def test_output_without_raw_contents_raises() -> None:
    response = pb.ModelInferResponse()
    response.outputs.add(name="out", datatype="FP32", shape=[1])
    response.outputs[0].contents.fp32_contents.append(1.0)
    with pytest.raises(ValueError, match="raw_output_contents"):
        output_array(response)


def test_infer_request_carries_raw_little_endian_contents() -> None:
    array = np.arange(12, dtype=np.float64).reshape(3, 4)[:, ::2]  # non-contiguous
    request = build_infer_request("digits", "input", array, datatype="FP32", version="2")
    assert (request.model_name, request.model_version) == ("digits", "2")
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("input", "FP32", [3, 2])
    assert not tensor.HasField("contents") and not request.outputs
    np.testing.assert_array_equal(np.frombuffer(request.raw_input_contents[0], "<f4").reshape(3, 2), array)
    assert decode_array(request.raw_input_contents[0], "FP32", [3, 2]).tolist() == array.tolist()


def test_datatype_of_unknown_dtype_raises() -> None:
    with pytest.raises(ValueError):
        datatype_of(np.zeros(2, dtype=np.complex64))


# ---------------------------------------------------------------------------
# client
# ---------------------------------------------------------------------------


def test_token_becomes_bearer_metadata() -> None:
    assert auth_metadata(None) == ()
    assert auth_metadata("s3cret") == (("authorization", "Bearer s3cret"),)
    # NOTE: a grpc channel connects lazily, so constructing a client opens no socket.
    with SlimserveClient("localhost:1", token="s3cret") as client:
        assert client.metadata == (("authorization", "Bearer s3cret"),)


# ---------------------------------------------------------------------------
# load generator
# ---------------------------------------------------------------------------


def test_load_result_percentiles_from_known_latencies() -> None:
    latencies_s = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    result = LoadResult.from_latencies(latencies_s, {"UNAVAILABLE": 2}, elapsed_s=4.0, concurrency=3)
    assert result.count == 100
    assert result.throughput == pytest.approx(25.0)
    # numpy's linear interpolation: rank q/100 * (n-1) between sorted values.
    assert result.p50_ms == pytest.approx(50.5)
    assert result.p90_ms == pytest.approx(90.1)
    assert result.p99_ms == pytest.approx(99.01)
    assert result.error_count == 2
    line = result.format()
    assert "\n" not in line
    expected = ["100 requests", "25.0 req/s", "p50 50.50 ms", "p90 90.10 ms", "p99 99.01 ms", "UNAVAILABLE 2"]
    for part in expected:
        assert part in line


def test_load_result_without_successes() -> None:
    result = LoadResult.from_latencies([], {}, elapsed_s=1.0, concurrency=1)
    assert result.count == 0 and result.throughput == 0.0 and np.isnan(result.p99_ms)
    assert "0 errors" in result.format()


def _rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="nope")


def test_run_load_closed_loop_counts_and_excludes_warmup() -> None:
    starts: list[float] = []
    in_flight = 0
    max_in_flight = 0

    async def call() -> None:
        nonlocal in_flight, max_in_flight
        starts.append(time.perf_counter())
        in_flight += 1
        max_in_flight = max(max_in_flight, in_flight)
        try:
            await asyncio.sleep(0.01)
            if len(starts) % 5 == 0:
                raise _rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED)
        finally:
            in_flight -= 1

    began = time.perf_counter()
    result = asyncio.run(run_load(call, concurrency=3, duration_s=0.3, warmup_s=0.1))
    assert max_in_flight == 3
    measured = [s for s in starts if s >= began + 0.1]
    assert 0 < len(measured) < len(starts)  # warm-up requests were sent but not recorded
    assert result.count + result.error_count == len(measured)
    assert set(result.errors) == {"RESOURCE_EXHAUSTED"} and result.error_count > 0
    assert result.elapsed_s >= 0.3
    assert all(lat >= 10.0 for lat in result.latencies_ms)  # each call sleeps 10 ms
    assert result.throughput == pytest.approx(result.count / result.elapsed_s)


def test_run_load_lets_non_grpc_exceptions_through() -> None:
    async def broken() -> None:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        asyncio.run(run_load(broken, concurrency=1, duration_s=0.05))


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def test_cli_parses_classify() -> None:
    argv = ["classify", "a.png", "b.jpg", "--top-k", "2", "--variant", "original"]
    args = cli.build_parser().parse_args(argv)
    assert [str(p) for p in args.images] == ["a.png", "b.jpg"]
    assert (args.model, args.top_k, args.variant, args.address, args.token) == (
        "digits",
        2,
        "original",
        "localhost:8001",
        None,
    )


def test_cli_parses_bench_defaults_and_options() -> None:
    parse = cli.build_parser().parse_args
    args = parse(["bench"])
    assert (args.mode, args.concurrency, args.duration, args.warmup, args.batch) == ("infer", 4, 10.0, 2.0, 1)
    args = parse(
        [
            "bench",
            "--mode",
            "classify",
            "--image",
            "x.png",
            "--concurrency",
            "8",
            "--batch",
            "16",
            "--duration",
            "3",
            "--warmup",
            "0",
            "--address",
            "h:9",
            "--model",
            "resnet",
        ]
    )
    assert (args.mode, str(args.image), args.concurrency, args.batch, args.duration, args.warmup) == (
        "classify",
        "x.png",
        8,
        16,
        3.0,
        0.0,
    )
    assert (args.address, args.model) == ("h:9", "resnet")


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--concurrency", "0"],
        ["bench", "--warmup", "-1"],
        ["bench", "--mode", "grpc"],
        ["bench", "--mode", "classify"],  # no --image
        ["classify"],  # no image
    ],
)
def test_cli_rejects_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_cli_reports_unreadable_image_without_contacting_the_server(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["classify", str(tmp_path / "missing.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.png" in err


def test_format_classification() -> None:
    result = classifier_pb2.ImageClassification(
        classes=[
            classifier_pb2.Class(label="seven", index=7, score=0.98765),
            classifier_pb2.Class(label="one", index=1, score=0.0123),
        ]
    )
    assert cli.format_classification("seven.png", result) == "seven.png: seven (0.988) one (0.012)"


def test_batched_shape() -> None:
    assert cli.batched_shape([-1, 1, 28, 28], 8) == [8, 1, 28, 28]
    with pytest.raises(ValueError):
        cli.batched_shape([1, 28, 28], 8)
    with pytest.raises(ValueError):
        cli.batched_shape([-1, 3, -1, -1], 8)
