from __future__ import annotations

import numpy as np
import pytest

from protos.errors import InvalidArgument
from protos.tensors import (
    array_from_raw,
    array_from_typed,
    classification_strings,
    decode_bytes_tensor,
    encode_bytes_tensor,
    softmax,
)


def test_raw_view_shares_memory_with_the_request_buffer() -> None:
    data = np.arange(24, dtype="<f4").tobytes()
    array = array_from_raw(data, "FP32", [2, 3, 4], "input")
    assert array.shape == (2, 3, 4) and array[1, 2, 3] == 23
    # zero-copy: the array is a view of the bytes object, not a copy of it
    assert np.shares_memory(array, np.frombuffer(data, np.uint8))
    assert not array.flags.owndata


def test_raw_length_mismatch_is_reported() -> None:
    with pytest.raises(InvalidArgument, match="8 bytes of raw contents, but shape \\[3\\] of FP32 needs 12"):
        array_from_raw(b"\0" * 8, "FP32", [3], "input")


def test_unknown_datatype() -> None:
    with pytest.raises(InvalidArgument, match="unsupported datatype 'FP8'"):
        array_from_raw(b"", "FP8", [0], "input")


def test_typed_contents() -> None:
    assert array_from_typed([1.0, 2.0], "FP32", [1, 2], "x").dtype == np.float32
    with pytest.raises(InvalidArgument, match="3 values"):
        array_from_typed([1.0, 2.0, 3.0], "FP32", [1, 2], "x")


def test_bytes_tensor_round_trip_and_truncation() -> None:
    elements = [b"", b"a", "é".encode(), b"x" * 300]
    raw = encode_bytes_tensor(elements)
    assert raw[:4] == b"\0\0\0\0" and decode_bytes_tensor(raw) == elements
    with pytest.raises(InvalidArgument, match="truncated"):
        decode_bytes_tensor(raw[:-1])


def test_classification_strings_are_sorted_with_labels() -> None:
    scores = np.array([[0.1, 3.0, 2.0], [5.0, -1.0, 0.0]], np.float32)
    out = classification_strings(scores, 2, ["cat", "dog", "owl"])
    assert out == [b"3.000000:1:dog", b"2.000000:2:owl", b"5.000000:0:cat", b"0.000000:2:owl"]
    assert len(classification_strings(scores, 10, None)) == 6  # k capped at the class count
    assert classification_strings(scores, 1, None) == [b"3.000000:1", b"5.000000:0"]


def test_softmax_rows_sum_to_one() -> None:
    probs = softmax(np.array([[1000.0, 1000.0], [0.0, -1000.0]], np.float32))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_allclose(probs[0], [0.5, 0.5])
