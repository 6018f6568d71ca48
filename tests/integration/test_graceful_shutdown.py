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


async def hammer(address: str, until: float) -> Counter[str]:
    """16 closed-loop clients until ``until`` or UNAVAILABLE; counts outcomes by status code name."""
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
                    return  # told the server is going away: a client (or load balancer) stops sending here

    await asyncio.gather(*(worker() for _ in range(16)))
    await channel.close()
    return outcomes


def test_sigterm_under_load_answers_everything_accepted(tmp_path: Path) -> None:
    config = tmp_path / "deploy.yaml"
    config.write_text(CONFIG)
    with slimserve_process(config, log_path=tmp_path / "server.log") as server:

        async def scenario() -> Counter[str]:
            load = asyncio.create_task(hammer(server.address, time.monotonic() + 6))
            await asyncio.sleep(2)
            server.process.send_signal(signal.SIGTERM)
            return await load

        outcomes = asyncio.run(scenario())
        assert server.process.wait(timeout=60) == 0
    # accepted requests were answered (OK); the rest were refused (UNAVAILABLE), never dropped or cancelled
    assert outcomes["OK"] > 50
    assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes
    log = (tmp_path / "server.log").read_text()
    assert "draining in-flight requests" in log and "stopped" in log
