"""SIGTERM under load over gRPC and HTTP at once: every request the server accepted gets its answer; the
process exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import pytest

from benchmarks.common import slimserve_process
from clients.codec import build_infer_request
from clients.loadgen import open_channel
from protos import grpc_service_pb2_grpc

pytestmark = pytest.mark.slow

CONFIG = """
models:
  - name: digits
    source: {format: builtin}
    labels: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    preprocessing: {channels: 1, resize: 28, crop: 28, mean: [0.1307], std: [0.3081]}
"""


CONCURRENCY = 32
REFUSALS = ("the server is not ready", "the server is shutting down")
"""The servicers' own UNAVAILABLE messages: a request refused before it was accepted."""
HTTP_REFUSAL = "the server is not ready"
"""The REST endpoint's refusal once the drain began: 503 with this error (server/transport/rest.py)."""
CONNECTION_REFUSED = "connection refused"
"""An HTTP request that found the listener closed: never sent, so never accepted (none lost)."""


async def hammer(address: str, until: float, refusals: list[tuple[float, str]]) -> Counter[str]:
    """CONCURRENCY closed-loop clients until ``until`` or UNAVAILABLE; counts outcomes by status code name
    and records each UNAVAILABLE's time and message in ``refusals``."""
    outcomes: Counter[str] = Counter()
    request = build_infer_request("digits", "input", np.zeros((1, 1, 28, 28), np.float32), datatype="FP32")
    channel = open_channel(address)
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)

    async def worker() -> None:
        while time.monotonic() < until:
            try:
                await stub.ModelInfer(request, timeout=30)
                outcomes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                outcomes[exc.code().name] += 1
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    refusals.append((time.monotonic(), exc.details()))
                    return  # told the server is going away: a client (or load balancer) stops sending here

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    await channel.close()
    return outcomes


async def hammer_http(address: str, until: float, refusals: list[tuple[float, str]]) -> Counter[str]:
    """The same over HTTP (binary tensor extension, as tritonclient.http sends it): outcomes are OK (200),
    UNAVAILABLE (503: its time and error go to ``refusals``), CONNECTION_REFUSED (also in ``refusals``), or
    the HTTP status / client exception otherwise. Like the gRPC clients, a worker stops at its first refusal."""
    outcomes: Counter[str] = Counter()
    raw = np.zeros((1, 1, 28, 28), np.float32).tobytes()
    tensor = {
        "name": "input",
        "shape": [1, 1, 28, 28],
        "datatype": "FP32",
        "parameters": {"binary_data_size": len(raw)},
    }
    header = json.dumps({"inputs": [tensor]}).encode()
    body, headers = header + raw, {"Inference-Header-Content-Length": str(len(header))}
    url = f"http://{address}/v2/models/digits/infer"
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def worker() -> None:
            while time.monotonic() < until:
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        answer = await response.read()
                except aiohttp.ClientConnectorError:
                    outcomes[CONNECTION_REFUSED] += 1
                    refusals.append((time.monotonic(), CONNECTION_REFUSED))
                    return
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:  # a dropped request: fails the test
                    outcomes[type(exc).__name__] += 1
                    return
                if response.status == 200:
                    outcomes["OK"] += 1
                    continue
                outcomes["UNAVAILABLE" if response.status == 503 else f"HTTP {response.status}"] += 1
                refusals.append((time.monotonic(), json.loads(answer).get("error", "")))
                return

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return outcomes


def test_sigterm_under_load_answers_everything_accepted(tmp_path: Path) -> None:
    """CONCURRENCY gRPC and CONCURRENCY HTTP clients, closed loop, when SIGTERM arrives."""
    config = tmp_path / "deploy.yaml"
    config.write_text(CONFIG)
    with slimserve_process(config, log_path=tmp_path / "server.log") as server:
        refusals: list[tuple[float, str]] = []
        http_refusals: list[tuple[float, str]] = []

        async def scenario() -> tuple[Counter[str], Counter[str], float]:
            until = time.monotonic() + 6
            load = asyncio.gather(
                hammer(server.address, until, refusals), hammer_http(server.http_address, until, http_refusals)
            )
            await asyncio.sleep(2)
            sigterm_at = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            outcomes, http_outcomes = await load
            return outcomes, http_outcomes, sigterm_at

        outcomes, http_outcomes, sigterm_at = asyncio.run(scenario())
        assert server.process.wait(timeout=60) == 0
    # accepted requests were answered (OK); the rest were refused (UNAVAILABLE), never dropped or cancelled
    assert outcomes["OK"] > 50 and http_outcomes["OK"] > 50, (outcomes, http_outcomes)
    assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes
    # over HTTP: 200, or 503 "the server is not ready" once the drain began; a connection refused after the
    # listener closed was never sent. No reset connection, no timeout, no other status.
    assert set(http_outcomes) <= {"OK", "UNAVAILABLE", CONNECTION_REFUSED}, http_outcomes
    assert len(http_refusals) == http_outcomes["UNAVAILABLE"] + http_outcomes[CONNECTION_REFUSED] == CONCURRENCY
    for when, message in http_refusals:
        assert when > sigterm_at and message in (HTTP_REFUSAL, CONNECTION_REFUSED), (when - sigterm_at, message)
    # every UNAVAILABLE is the server refusing a request that arrived after the drain began, not a transport
    # error on an accepted request ("Socket closed", "Connection reset")
    assert len(refusals) == outcomes["UNAVAILABLE"] == CONCURRENCY
    for when, message in refusals:
        assert when > sigterm_at and message in REFUSALS, (when - sigterm_at, message)
    log = (tmp_path / "server.log").read_text()
    assert "draining in-flight requests" in log and "stopped" in log
