"""numpy arrays <-> KServe v2 ModelInfer messages, on the client side.

Tensors travel as raw bytes (`raw_input_contents` / `raw_output_contents`), as
the stock Triton client sends and reads them. The byte-level conventions
(little-endian dtypes, length-prefixed BYTES) are shared with the server
through `protos.tensors`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from protos import classifier_pb2
from protos import grpc_service_pb2 as pb
from protos.errors import ServingError
from protos.tensors import DATATYPES, array_from_raw, decode_bytes_tensor, encode_bytes_tensor

# numpy dtype (native byte order) -> datatype string.
_DATATYPE_OF = {dtype.newbyteorder("="): name for name, dtype in DATATYPES.items()}


def datatype_of(array: np.ndarray) -> str:
    """The KServe v2 datatype string for an array's dtype (object/bytes arrays are BYTES)."""
    if array.dtype.kind in ("O", "S"):
        return "BYTES"
    try:
        return _DATATYPE_OF[array.dtype.newbyteorder("=")]
    except KeyError:
        raise ValueError(f"no KServe v2 datatype for numpy dtype {array.dtype}") from None


def encode_array(array: np.ndarray, datatype: str) -> bytes:
    """Raw wire bytes of `array` as `datatype`: row-major, little-endian; BYTES length-prefixed.

    Numeric arrays are cast to the datatype (e.g. float64 -> FP32) first.
    """
    if datatype == "BYTES":
        return encode_bytes_tensor([_as_bytes(e) for e in np.asarray(array, dtype=object).ravel()])
    if datatype not in DATATYPES:
        raise ValueError(f"unsupported datatype {datatype!r}")
    # NOTE: ascontiguousarray makes tobytes() row-major whatever the input strides.
    return np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes()


def decode_array(raw: bytes, datatype: str, shape: list[int]) -> np.ndarray:
    """Array of `shape` from raw wire bytes; read-only when it is a view of `raw`.

    BYTES gives an object array of `bytes`; BF16 (which numpy lacks) gives float32.
    """
    try:
        if datatype == "BYTES":
            elements = decode_bytes_tensor(raw)
            count = int(np.prod(shape, dtype=np.int64))
            if len(elements) != count:
                raise ValueError(f"{len(elements)} BYTES elements, but shape {shape} needs {count}")
            out = np.empty(count, dtype=object)
            out[:] = elements
            return out.reshape(shape)
        if datatype == "BF16":
            # NOTE: bfloat16 is the top half of a float32's bits.
            half = array_from_raw(raw, "UINT16", shape, "BF16 tensor")
            return (half.astype(np.uint32) << 16).view(np.float32)
        return array_from_raw(raw, datatype, shape, f"{datatype} tensor")
    except ServingError as exc:
        raise ValueError(str(exc)) from exc


def build_infer_request(
    model: str, input_name: str, array: np.ndarray, *, datatype: str | None = None, version: str = ""
) -> pb.ModelInferRequest:
    """A ModelInferRequest with one input, its data in raw_input_contents; all outputs are returned."""
    datatype = datatype or datatype_of(array)
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name=input_name, datatype=datatype, shape=list(array.shape))
    request.raw_input_contents.append(encode_array(array, datatype))
    return request


def build_classify_request(
    images: Sequence[bytes], *, model: str, top_k: int, variant: str
) -> classifier_pb2.ClassifyRequest:
    return classifier_pb2.ClassifyRequest(model_name=model, images=list(images), top_k=top_k, variant=variant)


def output_array(response: pb.ModelInferResponse, index: int = 0) -> np.ndarray:
    """Output `index` of a ModelInferResponse, from raw_output_contents, with its datatype and shape."""
    if index >= len(response.outputs):
        raise ValueError(f"response has {len(response.outputs)} outputs, no output {index}")
    if index >= len(response.raw_output_contents):
        raise ValueError(f"response has no raw_output_contents for output {index}")
    tensor = response.outputs[index]
    return decode_array(response.raw_output_contents[index], tensor.datatype, list(tensor.shape))


def _as_bytes(element: object) -> bytes:
    if isinstance(element, bytes):
        return element
    if isinstance(element, str):
        return element.encode("utf-8")
    raise ValueError(f"BYTES elements must be bytes or str, got {type(element).__name__}")
