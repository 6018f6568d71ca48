"""Triton's perf_analyzer (from the tritonclient wheel) profiles slimserve over gRPC and over HTTP (the KServe
v2 REST endpoint), server-side breakdown included."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.serving import ServerThread

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "perf_analyzer.sh"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_runs_against_slimserve(digits_server: ServerThread, protocol: str) -> None:
    """perf_analyzer first reads /v2, the model's metadata and config, then infers and reads the statistics
    before and after each window: over HTTP it parses every one of those JSON answers strictly."""
    address = digits_server.http_address if protocol == "http" else digits_server.address
    args = [
        "-m",
        "digits",
        "-u",
        address,
        "--concurrency-range",
        "1:2:1",
        "--measurement-mode",
        "count_windows",
        "--measurement-request-count",
        "50",
        "--stability-percentage",
        "999",
        # NOTE: 999 % accepts any three windows that all completed requests; the spare trials are for a window
        # that did not (a loaded shared machine), and cost nothing when the first three are fine.
        "--max-trials",
        "10",
    ]
    environment = {**os.environ, "PROTOCOL": protocol}
    result = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=600, env=environment)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Inferences/Second vs. Client Average Batch Latency" in output
    assert "Concurrency: 2, throughput:" in output, output[-3000:]
    # the client side timed the transport perf_analyzer was asked for
    assert ("Avg HTTP time" if protocol == "http" else "Avg gRPC time") in output, output[-3000:]
    # the server-side breakdown comes from ModelStatistics (GET /v2/models/digits/stats over HTTP)
    assert "Server:" in output and "compute infer" in output, output[-3000:]
    assert "Successful request count" in output, output[-3000:]
