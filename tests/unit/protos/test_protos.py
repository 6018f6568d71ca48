"""The protocol files: generated code is current and the wire matches the stock Triton client.

NOTE: `tritonclient.grpc` and our `protos` cannot be imported into one process:
both register `inference.*` symbols in protobuf's default descriptor pool (from
different file names), and the second import fails with "duplicate symbol".
So this module loads the stock client's own compiled descriptors (the
serialized FileDescriptorProtos embedded in tritonclient's *_pb2.py) into a
private DescriptorPool, and exercises the real client library in a subprocess.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from protos import generate, grpc_service_pb2
from tests import REPO_ROOT

# The messages the stock client sends or parses.
CLIENT_MESSAGES = [
    "ModelInferRequest",
    "ModelInferResponse",
    "InferParameter",
    "ModelMetadataResponse",
    "ModelConfigResponse",
    "ModelStreamInferResponse",
    "ModelStatisticsResponse",
    "ServerMetadataResponse",
]


def _tritonclient_grpc_dir() -> Path:
    spec = importlib.util.find_spec("tritonclient")
    assert spec is not None and spec.submodule_search_locations, "tritonclient is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / "grpc"


def _embedded_descriptor(pb2_file: Path) -> bytes:
    """The serialized FileDescriptorProto a generated *_pb2.py passes to AddSerializedFile."""
    for node in ast.walk(ast.parse(pb2_file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile":
            return ast.literal_eval(node.args[0])
    raise AssertionError(f"no AddSerializedFile call in {pb2_file}")


@pytest.fixture(scope="module")
def client_pool() -> descriptor_pool.DescriptorPool:
    """tritonclient's model_config.proto and grpc_service.proto, in a pool of their own."""
    pool = descriptor_pool.DescriptorPool()
    for name in ("model_config_pb2.py", "service_pb2.py"):
        serialized = _embedded_descriptor(_tritonclient_grpc_dir() / name)
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(serialized))
    return pool


def _ours(name: str) -> type:
    return getattr(grpc_service_pb2, name)


def _theirs(pool: descriptor_pool.DescriptorPool, name: str) -> type:
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"inference.{name}"))


# ---------------------------------------------------------------------------
# (a) generated code is up to date
# ---------------------------------------------------------------------------


def test_generated_code_is_up_to_date() -> None:
    assert generate.stale_files() == [], "run `python -m protos.generate`"


def test_check_detects_edited_missing_and_orphan_files(tmp_path: Path) -> None:
    shutil.copytree(REPO_ROOT / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("__pycache__"))
    assert generate.stale_files(tmp_path) == []
    edited = tmp_path / "protos" / "grpc_service_pb2.py"
    edited.write_text(edited.read_text() + "# hand edit\n")
    (tmp_path / "protos" / "classifier_pb2.pyi").unlink()
    (tmp_path / "protos" / "old_pb2.py").write_text("")
    assert generate.stale_files(tmp_path) == [
        "classifier_pb2.pyi (missing)",
        "grpc_service_pb2.py (differs)",
        "old_pb2.py (no .proto generates it)",
    ]


def test_only_service_files_get_grpc_modules() -> None:
    names = {p.name for p in generate.generated_files()}
    assert {"grpc_service_pb2_grpc.py", "classifier_pb2_grpc.py"} <= names
    assert "model_config_pb2_grpc.py" not in names


# ---------------------------------------------------------------------------
# (b) wire compatibility with the stock client
# ---------------------------------------------------------------------------


def _assert_same_fields(ours: Descriptor, theirs: Descriptor, seen: set[str]) -> None:
    """Every field the client knows exists in ours with the same number, name, type and label."""
    if theirs.full_name in seen:
        return
    seen.add(theirs.full_name)
    assert ours.full_name == theirs.full_name
    for field in theirs.fields:
        mine = ours.fields_by_number.get(field.number)
        where = f"{theirs.full_name} field {field.number}"
        assert mine is not None, f"{where} ({field.name}) is missing"
        assert (mine.name, mine.type, mine.is_repeated) == (field.name, field.type, field.is_repeated), where
        assert (mine.containing_oneof is None) == (field.containing_oneof is None), where
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            _assert_same_fields(mine.message_type, field.message_type, seen)
        if field.type == FieldDescriptor.TYPE_ENUM:
            assert {v.name: v.number for v in mine.enum_type.values} == {
                v.name: v.number for v in field.enum_type.values
            }, where


@pytest.mark.parametrize("name", CLIENT_MESSAGES)
def test_fields_match_the_client(client_pool: descriptor_pool.DescriptorPool, name: str) -> None:
    _assert_same_fields(_ours(name).DESCRIPTOR, client_pool.FindMessageTypeByName(f"inference.{name}"), set())


def _scalar(field: FieldDescriptor, salt: int) -> object:
    """A non-default value for a scalar field; `salt` makes repeated elements and map keys differ."""
    t = field.type
    if t == FieldDescriptor.TYPE_BOOL:
        return True
    if t == FieldDescriptor.TYPE_STRING:
        return f"{field.name}-{salt}"
    if t == FieldDescriptor.TYPE_BYTES:
        return f"{field.name}\x00\xff{salt}".encode("latin-1")
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return field.number + salt + 0.5
    if t == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values[-1].number
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64):
        return -(field.number * 1000 + salt)
    return field.number * 1000 + salt  # unsigned


def _fill(msg, variant: int, depth: int = 0) -> None:
    """Set every field of `msg`, recursively; for each oneof, member number `variant` (cycled)."""
    desc = msg.DESCRIPTOR
    chosen = {o.name: o.fields[variant % len(o.fields)].name for o in desc.oneofs}
    for field in desc.fields:
        if field.containing_oneof is not None and chosen[field.containing_oneof.name] != field.name:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_f, value_f = (field.message_type.fields_by_name[n] for n in ("key", "value"))
            target = getattr(msg, field.name)
            for salt in (1, 2):
                key = _scalar(key_f, salt)
                if value_f.message_type is not None:
                    _fill(target[key], variant + salt, depth + 1)
                else:
                    target[key] = _scalar(value_f, salt)
        elif field.is_repeated:
            target = getattr(msg, field.name)
            for salt in (1, 2):
                if field.message_type is not None:
                    _fill(target.add(), variant + salt, depth + 1)
                else:
                    target.append(_scalar(field, salt))
        elif field.message_type is not None:
            if depth < 8:
                sub = getattr(msg, field.name)
                sub.SetInParent()
                _fill(sub, variant, depth + 1)
        else:
            setattr(msg, field.name, _scalar(field, 0))


def _as_dict(msg) -> dict:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


@pytest.mark.parametrize("variant", range(5))  # InferParameter has 5 oneof members
@pytest.mark.parametrize("name", CLIENT_MESSAGES)
def test_round_trip_with_the_client(client_pool: descriptor_pool.DescriptorPool, name: str, variant: int) -> None:
    ours_cls, theirs_cls = _ours(name), _theirs(client_pool, name)
    for build_cls, parse_cls in ((ours_cls, theirs_cls), (theirs_cls, ours_cls)):
        built = build_cls()
        _fill(built, variant)
        parsed = parse_cls.FromString(built.SerializeToString())
        # Field-for-field: a field number the other side did not know would be
        # kept only as an unknown field and be missing from the dict.
        assert _as_dict(parsed) == _as_dict(built)
        assert build_cls.FromString(parsed.SerializeToString()) == built


# ---------------------------------------------------------------------------
# (b') the real client library, in its own process
# ---------------------------------------------------------------------------

_CLIENT_SCRIPT = """
import json, sys
import numpy as np
import tritonclient.grpc as g
from tritonclient.grpc import service_pb2
from tritonclient.grpc._utils import _get_inference_request

response = service_pb2.ModelInferResponse.FromString(bytes.fromhex(sys.stdin.read()))
result = g.InferResult(response)
x = np.arange(6, dtype=np.float32).reshape(2, 3)
inp = g.InferInput("input", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
request = _get_inference_request(
    model_name="digits", inputs=[inp], model_version="1", request_id="req-7",
    outputs=[g.InferRequestedOutput("logits", class_count=3)], sequence_id=0, sequence_start=False,
    sequence_end=False, priority=0, timeout=None, parameters={"note": "hi"},
)
print(json.dumps({
    "logits": result.as_numpy("logits").tolist(),
    "labels": [s.decode() for s in result.as_numpy("labels").ravel()],
    "id": result.get_response().id,
    "request": request.SerializeToString().hex(),
}))
"""


def test_the_stock_client_reads_our_response_and_we_read_its_request() -> None:
    logits = np.array([[0.25, -1.5], [3.0, 4.5]], dtype=np.float32)
    labels = [b"0.9:3:three", b"0.1:1"]
    response = grpc_service_pb2.ModelInferResponse(model_name="digits", model_version="1", id="req-7")
    response.outputs.add(name="logits", datatype="FP32", shape=[2, 2])
    response.outputs.add(name="labels", datatype="BYTES", shape=[2, 1])
    response.raw_output_contents.append(logits.tobytes())
    response.raw_output_contents.append(b"".join(len(s).to_bytes(4, "little") + s for s in labels))

    done = subprocess.run(
        [sys.executable, "-c", _CLIENT_SCRIPT],
        input=response.SerializeToString().hex(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["logits"] == logits.tolist()
    assert seen["labels"] == [s.decode() for s in labels]
    assert seen["id"] == "req-7"

    request = grpc_service_pb2.ModelInferRequest.FromString(bytes.fromhex(seen["request"]))
    assert (request.model_name, request.model_version, request.id) == ("digits", "1", "req-7")
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("input", "FP32", [2, 3])
    assert not tensor.HasField("contents")  # data travels in raw_input_contents only
    data = np.frombuffer(request.raw_input_contents[0], dtype="<f4").reshape(2, 3)
    np.testing.assert_array_equal(data, np.arange(6, dtype=np.float32).reshape(2, 3))
    (out,) = request.outputs
    assert out.name == "logits"
    assert out.parameters["classification"].WhichOneof("parameter_choice") == "int64_param"
    assert out.parameters["classification"].int64_param == 3
    assert request.parameters["note"].string_param == "hi"


# ---------------------------------------------------------------------------
# (c) the service: RPC names and method paths
# ---------------------------------------------------------------------------


def _rpcs(service) -> list[tuple[str, str, str, bool, bool]]:
    return [
        (m.full_name, m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming)
        for m in service.methods
    ]


def test_service_methods_match_the_client(client_pool: descriptor_pool.DescriptorPool) -> None:
    ours = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = client_pool.FindServiceByName("inference.GRPCInferenceService")
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    assert sorted(_rpcs(ours)) == sorted(_rpcs(theirs))


_PATH_RE = re.compile(r"'(/inference\.GRPCInferenceService/\w+)'")


def test_stub_method_paths_match_the_client() -> None:
    ours = set(_PATH_RE.findall((REPO_ROOT / "protos" / "grpc_service_pb2_grpc.py").read_text()))
    theirs = set(_PATH_RE.findall((_tritonclient_grpc_dir() / "service_pb2_grpc.py").read_text()))
    assert len(theirs) == 20
    assert ours == theirs
