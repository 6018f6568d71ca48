"""SIGTERM under load: every request the server accepted gets its answer; the process exits 0."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path

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


def test_sigterm_under_load_answers_everything_accepted(tmp_path: Path) -> None:
    config = tmp_path / "deploy.yaml"
    config.write_text(CONFIG)
    with slimserve_process(config, log_path=tmp_path / "server.log") as server:
        refusals: list[tuple[float, str]] = []

        async def scenario() -> tuple[Counter[str], float]:
            load = asyncio.create_task(hammer(server.address, time.monotonic() + 6, refusals))
            await asyncio.sleep(2)
            sigterm_at = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            return await load, sigterm_at

        outcomes, sigterm_at = asyncio.run(scenario())
        assert server.process.wait(timeout=60) == 0
    # accepted requests were answered (OK); the rest were refused (UNAVAILABLE), never dropped or cancelled
    assert outcomes["OK"] > 50
    assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes
    # every UNAVAILABLE is the server refusing a request that arrived after the drain began, not a transport
    # error on an accepted request ("Socket closed", "Connection reset")
    assert len(refusals) == outcomes["UNAVAILABLE"] == CONCURRENCY
    for when, message in refusals:
        assert when > sigterm_at and message in REFUSALS, (when - sigterm_at, message)
    log = (tmp_path / "server.log").read_text()
    assert "draining in-flight requests" in log and "stopped" in log
