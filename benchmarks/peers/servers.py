"""The servers of the serving benchmark, started alike: slimserve, Seldon MLServer and TorchServe.

Each serves the same resnet18 state_dict (``build/peers/resnet18.pt``, see ``weights.py``) on loopback
with the same dynamic-batching limits (:class:`Batching`), in its own process. The peers run from their
own venvs, made by ``setup_mlserver.sh`` and ``setup_torchserve.sh``; a peer that is not set up says so
in :meth:`Server.missing`. The client side (requests, channels) runs in the project's venv, so the load
generator is the same for every server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
import numpy as np
import yaml

from benchmarks.common import REPO_ROOT, free_port, slimserve_process
from clients.client import CHANNEL_OPTIONS
from clients.codec import build_infer_request, output_array
from clients.loadgen import Call
from compression.models.names import INPUT_NAME, ORIGINAL
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc

BUILD_DIR = REPO_ROOT / "build" / "peers"
PEERS_DIR = REPO_ROOT / "benchmarks" / "peers"
WEIGHTS = BUILD_DIR / "resnet18.pt"
MODEL = "resnet18"
INPUT_SHAPE = (3, 224, 224)
EXAMPLE_CONFIG = REPO_ROOT / "deploy" / "examples" / "resnet18.yaml"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
READY_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Batching:
    """Dynamic-batching limits every server gets: the most rows per forward pass, and how long to wait."""

    max_batch_size: int
    max_delay_ms: float


class Server(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def variant(self) -> str:
        """The model variant it serves (peers serve the original)."""
        ...

    def missing(self) -> str | None:
        """Why this server cannot run here (not set up), or None."""
        ...

    def serve(self, batching: Batching, log_path: Path) -> AbstractContextManager[str]:
        """The server running on loopback, as its gRPC address; stopped afterwards."""
        ...

    def call(self, channel: grpc.aio.Channel, array: np.ndarray) -> Call:
        """An async call that sends one inference request with ``array`` (built once, sent many times)."""
        ...

    def infer(self, channel: grpc.Channel, array: np.ndarray) -> np.ndarray:
        """One blocking inference request: ``array``'s logits."""
        ...


# --- KServe v2 (slimserve and MLServer speak the same protocol) ------------------------------------


@dataclass(frozen=True)
class KServeClient:
    """ModelInfer requests with the tensor in ``raw_input_contents``, as tritonclient sends them."""

    version: str = ""

    def call(self, channel: grpc.aio.Channel, array: np.ndarray) -> Call:
        request = build_infer_request(MODEL, INPUT_NAME, array, datatype="FP32", version=self.version)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return lambda: stub.ModelInfer(request)

    def infer(self, channel: grpc.Channel, array: np.ndarray) -> np.ndarray:
        request = build_infer_request(MODEL, INPUT_NAME, array, datatype="FP32", version=self.version)
        return output_array(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=120))


@dataclass(frozen=True)
class Slimserve(KServeClient):
    """slimserve itself; ``version`` pins the variant (``original`` or ``compressed``)."""

    name: str = "slimserve"
    compression: dict[str, object] | None = None
    """The deploy config's compression block, for the compressed variant (its artifact must be cached)."""
    label: str = ""
    """Tells apart compressed variants searched under different compression blocks (default: ``version``)."""

    @property
    def variant(self) -> str:
        return self.label or self.version

    def missing(self) -> str | None:
        return None if WEIGHTS.exists() else f"{WEIGHTS} is missing: run benchmarks/peers/weights.py {WEIGHTS}"

    def config(self, batching: Batching) -> Path:
        """The deploy config: ``deploy/examples/resnet18.yaml`` with the shared weights and ``batching``."""
        path = BUILD_DIR / "slimserve" / f"resnet18{'-' + self.label if self.label else ''}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        document = yaml.safe_load(EXAMPLE_CONFIG.read_text())
        (model,) = document["models"]
        model["source"]["weights"] = str(WEIGHTS)
        model["batching"] = {"max_batch_size": batching.max_batch_size, "max_queue_delay_ms": batching.max_delay_ms}
        if self.compression is None:
            model.pop("compression", None)
        else:
            model["compression"] = self.compression
        document["server"] = {"max_message_bytes": MAX_MESSAGE_BYTES}
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        return path

    def in_server_seconds(self, address: str) -> tuple[int, float, float]:
        """Requests answered so far, their summed time in the server, and of that the batches' compute time."""
        with grpc.insecure_channel(address) as channel:
            request = pb.ModelStatisticsRequest(name=MODEL, version=self.version)
            (stats,) = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(request, timeout=30).model_stats
        success, infer = stats.inference_stats.success, stats.inference_stats.compute_infer
        return success.count, success.ns / 1e9, infer.ns / 1e9

    @contextmanager
    def serve(self, batching: Batching, log_path: Path) -> Iterator[str]:
        with slimserve_process(self.config(batching), log_path=log_path, ready_timeout_s=READY_TIMEOUT_S) as server:
            yield server.address


# --- peers -------------------------------------------------------------------------------------------


@contextmanager
def peer_process(
    name: str, command: list[str], log_path: Path, ready: Callable[[], bool], *, cwd: Path, env: dict[str, str]
) -> Iterator[None]:
    """``command`` in its own session (a peer forks workers), until ``ready()``; the group is ended afterwards."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=cwd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            wait_until(ready, process, name, log_path)
            yield
        finally:
            stop_group(process)


def wait_until(ready: Callable[[], bool], process: subprocess.Popen[bytes], name: str, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode} before it was ready; see {log_path}")
        try:
            if ready():
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{name} not ready after {READY_TIMEOUT_S:.0f} s; see {log_path}")


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the session this process leads (its workers too), SIGKILL if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def answers(server: Server, address: str) -> Callable[[], bool]:
    """A readiness probe: one real inference request succeeds."""

    def probe() -> bool:
        with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            server.infer(channel, np.zeros((1, *INPUT_SHAPE), np.float32))
        return True

    return probe


def venv_missing(venv: Path, setup: str, *files: Path) -> str | None:
    for path in (venv / "bin" / "python", WEIGHTS, *files):
        if not path.exists():
            return f"not set up ({path} is missing): run benchmarks/peers/{setup}"
    return None


@dataclass(frozen=True)
class MLServer(KServeClient):
    """Seldon MLServer 1.7.1 with ``mlserver_runtime.ResNet18Runtime``, over its KServe v2 gRPC API.

    ``parallel_workers: 0``: the model runs in the server process itself (MLServer's default of one
    worker process adds an inter-process hop per request; slimserve runs in one process too). Adaptive
    batching is on with the same limits; MLServer turns it off when ``max_batch_time`` is 0.
    """

    name: str = "mlserver"
    variant: str = ORIGINAL
    root: Path = BUILD_DIR / "mlserver"

    def missing(self) -> str | None:
        return venv_missing(self.root / "venv", "setup_mlserver.sh")

    def write_repository(self, batching: Batching, grpc_port: int) -> Path:
        repository = self.root / "run"
        (repository / MODEL).mkdir(parents=True, exist_ok=True)
        settings = {
            "host": "127.0.0.1",
            "http_port": free_port(),
            "grpc_port": grpc_port,
            "metrics_port": free_port(),
            "parallel_workers": 0,
            "debug": False,  # NOTE: MLServer's default (True) logs every request (gRPC access log)
            "grpc_max_message_length": MAX_MESSAGE_BYTES,  # NOTE: MLServer's default is grpcio's 4 MB
        }
        model = {
            "name": MODEL,
            "implementation": "mlserver_runtime.ResNet18Runtime",
            "max_batch_size": batching.max_batch_size,
            "max_batch_time": batching.max_delay_ms / 1000,  # seconds
            "parameters": {"uri": str(WEIGHTS)},
        }
        (repository / "settings.json").write_text(json.dumps(settings, indent=2))
        (repository / MODEL / "model-settings.json").write_text(json.dumps(model, indent=2))
        return repository

    @contextmanager
    def serve(self, batching: Batching, log_path: Path) -> Iterator[str]:
        if batching.max_delay_ms <= 0:
            print("note: MLServer's adaptive batching is off with a max delay of 0", file=sys.stderr)
        port = free_port()
        repository = self.write_repository(batching, port)
        address = f"127.0.0.1:{port}"
        command = [str(self.root / "venv" / "bin" / "mlserver"), "start", str(repository)]
        env = {"PYTHONPATH": str(PEERS_DIR)}  # mlserver_runtime.py and weights.py
        with peer_process(self.name, command, log_path, answers(self, address), cwd=repository, env=env):
            yield address


@dataclass(frozen=True)
class TorchServe:
    """TorchServe 0.12 with ``torchserve_handler.py``, over its native gRPC ``Predictions`` API.

    One worker (the model uses every core inside a forward pass, as slimserve's one inference thread
    does), TorchServe's server-side batching with the same limits, token auth and snapshots off.
    """

    name: str = "torchserve"
    variant: str = ORIGINAL
    root: Path = BUILD_DIR / "torchserve"

    @property
    def stubs(self) -> Path:
        return self.root / "stubs"

    def missing(self) -> str | None:
        archive = self.root / "model-store" / f"{MODEL}.mar"
        return venv_missing(self.root / "venv", "setup_torchserve.sh", archive, self.stubs / "inference_pb2_grpc.py")

    def _pb(self) -> tuple[object, object]:
        """The generated ``inference_pb2`` and ``inference_pb2_grpc`` (built by setup_torchserve.sh)."""
        if str(self.stubs) not in sys.path:
            sys.path.insert(0, str(self.stubs))
        import inference_pb2  # type: ignore[import-not-found]
        import inference_pb2_grpc  # type: ignore[import-not-found]

        return inference_pb2, inference_pb2_grpc

    def _request_and_stub(self, channel: grpc.Channel | grpc.aio.Channel, array: np.ndarray) -> tuple[object, object]:
        pb, pb_grpc_ts = self._pb()
        request = pb.PredictionsRequest(model_name=MODEL, input={"data": np.ascontiguousarray(array).tobytes()})  # type: ignore[attr-defined]
        return request, pb_grpc_ts.InferenceAPIsServiceStub(channel)  # type: ignore[attr-defined]

    def call(self, channel: grpc.aio.Channel, array: np.ndarray) -> Call:
        request, stub = self._request_and_stub(channel, array)
        return lambda: stub.Predictions(request)  # type: ignore[attr-defined]

    def infer(self, channel: grpc.Channel, array: np.ndarray) -> np.ndarray:
        request, stub = self._request_and_stub(channel, array)
        response = stub.Predictions(request, timeout=120)  # type: ignore[attr-defined]
        return np.frombuffer(response.prediction, np.float32).reshape(array.shape[0], -1)

    def write_config(self, batching: Batching, grpc_port: int) -> Path:
        run = self.root / "run"
        run.mkdir(parents=True, exist_ok=True)
        model = {
            "defaultVersion": True,
            "marName": f"{MODEL}.mar",
            "minWorkers": 1,
            "maxWorkers": 1,
            "batchSize": batching.max_batch_size,
            # NOTE: TorchServe takes whole milliseconds.
            "maxBatchDelay": round(batching.max_delay_ms),
            "responseTimeout": 120,
        }
        properties = {
            "inference_address": f"http://127.0.0.1:{free_port()}",
            "management_address": f"http://127.0.0.1:{free_port()}",
            "metrics_address": f"http://127.0.0.1:{free_port()}",
            "grpc_inference_address": "127.0.0.1",
            "grpc_inference_port": grpc_port,
            "grpc_management_address": "127.0.0.1",
            "grpc_management_port": free_port(),
            "model_store": self.root / "model-store",
            "load_models": f"{MODEL}.mar",
            "models": json.dumps({MODEL: {"1.0": model}}),
            "default_workers_per_model": 1,
            "disable_token_authorization": "true",
            "enable_model_api": "false",
            "disable_system_metrics": "true",
            "max_request_size": MAX_MESSAGE_BYTES,
            "max_response_size": MAX_MESSAGE_BYTES,
        }
        path = run / "config.properties"
        path.write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
        return path

    @contextmanager
    def serve(self, batching: Batching, log_path: Path) -> Iterator[str]:
        port = free_port()
        config = self.write_config(batching, port)
        address = f"127.0.0.1:{port}"
        command = [
            str(self.root / "venv" / "bin" / "torchserve"),
            "--start",
            "--foreground",
            "--ts-config",
            str(config),
            "--model-store",
            str(self.root / "model-store"),
            "--disable-token-auth",
            "--ncs",  # no config snapshots: every run starts from this config
            "--log-config",  # warnings only: the default logs several lines per request
            str(PEERS_DIR / "torchserve_log4j2.xml"),
        ]
        # NOTE: the launcher finds java and the worker's python through PATH.
        env = {"PATH": f"{self.root / 'venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
        with peer_process(self.name, command, log_path, answers(self, address), cwd=config.parent, env=env):
            yield address


PEERS: dict[str, Callable[[], Server]] = {"mlserver": MLServer, "torchserve": TorchServe}


def slimserve(variant: str = ORIGINAL, compression: dict[str, object] | None = None, label: str = "") -> Slimserve:
    return Slimserve(version=variant, name=f"slimserve ({label or variant})", compression=compression, label=label)
