"""Triton's perf_analyzer (from the tritonclient wheel) profiles slimserve, server-side breakdown included."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.serving import ServerThread

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "perf_analyzer.sh"


def test_perf_analyzer_runs_against_slimserve(digits_server: ServerThread) -> None:
    args = [
        "-m",
        "digits",
        "-u",
        digits_server.address,
        "--concurrency-range",
        "1:2:1",
        "--measurement-mode",
        "count_windows",
        "--measurement-request-count",
        "50",
        "--stability-percentage",
        "999",
        "--max-trials",
        "3",
    ]
    result = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Inferences/Second vs. Client Average Batch Latency" in output
    # the server-side breakdown comes from ModelStatistics
    assert "Server:" in output and "compute infer" in output, output[-3000:]
