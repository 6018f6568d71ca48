"""Bytes on the wire <-> numpy arrays, following the KServe v2 / Triton conventions.

Inputs arrive as ``raw_input_contents`` (little-endian, row-major); they are viewed with
``np.frombuffer``, not copied. BYTES elements are a uint32 little-endian length then the bytes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np

from protos.errors import InvalidArgument

# NOTE: explicit little-endian dtypes: the wire format is little-endian whatever the host is.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}

# Typed ``InferTensorContents`` field holding each datatype, for clients that do not send raw bytes.
TYPED_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def array_from_raw(raw: bytes, datatype: str, shape: Sequence[int], what: str) -> np.ndarray:
    """View ``raw`` as an array of ``shape`` without copying; checks the byte length first."""
    dtype = _dtype(datatype, what)
    # NOTE: math.prod, not np.prod: this runs per request, and numpy's reduction costs ~10 us here.
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"{what}: {len(raw)} bytes of raw contents, but shape {list(shape)} of {datatype} needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def array_from_typed(values: Sequence[object], datatype: str, shape: Sequence[int], what: str) -> np.ndarray:
    """Build an array from typed ``contents`` (a copy: these arrive as Python lists)."""
    dtype = _dtype(datatype, what)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidArgument(f"{what}: {len(values)} values in contents, but shape {list(shape)} needs {count}")
    return np.asarray(values, dtype=dtype).reshape(shape)


def encode_bytes_tensor(elements: Sequence[bytes]) -> bytes:
    """Serialise BYTES elements: each a uint32 little-endian length followed by the bytes."""
    parts = []
    for element in elements:
        parts.append(struct.pack("<I", len(element)))
        parts.append(element)
    return b"".join(parts)


def decode_bytes_tensor(raw: bytes) -> list[bytes]:
    """Inverse of :func:`encode_bytes_tensor`; raises InvalidArgument on a truncated buffer."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidArgument("BYTES tensor is truncated inside a length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidArgument("BYTES tensor is truncated inside an element")
        elements.append(bytes(raw[offset : offset + length]))
        offset += length
    return elements


def classification_strings(scores: np.ndarray, k: int, labels: Sequence[str] | None) -> list[bytes]:
    """Triton's classification extension: per row the top ``k`` as ``"score:index[:label]"``, row-major.

    ``scores`` is (batch, classes); the result has ``batch * min(k, classes)`` elements.
    """
    k = min(k, scores.shape[1])
    top = top_k_indices(scores, k)
    out: list[bytes] = []
    for row, indices in zip(scores, top):
        for index in indices:
            text = f"{row[index]:f}:{index}"
            if labels is not None:
                text += f":{labels[index]}"
            out.append(text.encode())
    return out


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores per row, largest first (ties: lower index first)."""
    # NOTE: argpartition would be O(n) but classifiers have few classes; a stable sort keeps ties ordered.
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _dtype(datatype: str, what: str) -> np.dtype:
    try:
        return DATATYPES[datatype]
    except KeyError:
        raise InvalidArgument(f"{what}: unsupported datatype {datatype!r}") from None
