"""Torch work off the inference thread leaves no long-lived OpenMP team behind (server/process/torch_threads.py)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from server.process.torch_threads import run_in_passing_thread
from tests import REPO_ROOT

SERVER = REPO_ROOT / "server"


def _parallel_work(size: int) -> tuple[str, float]:
    """A tensor op big enough for torch to run as an OpenMP parallel region, and the thread it ran on."""
    return threading.current_thread().name, float(torch.ones(size, size).sum())


def test_the_function_runs_on_a_thread_that_is_gone_afterwards() -> None:
    name, total = asyncio.run(run_in_passing_thread(_parallel_work, 512))
    assert total == 512 * 512 and name.startswith("torch-once")
    deadline = time.monotonic() + 5
    while any(t.name == name for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == name for t in threading.enumerate())


def test_exceptions_reach_the_caller() -> None:
    def fail() -> None:
        raise ValueError("bad model file")

    with pytest.raises(ValueError, match="bad model file"):
        asyncio.run(run_in_passing_thread(fail))


def test_the_server_does_not_use_asyncio_default_threads() -> None:
    """asyncio.to_thread's threads live on: torch work there would slow every forward pass."""
    offenders = [str(p.relative_to(SERVER)) for p in SERVER.rglob("*.py") if "asyncio.to_thread(" in p.read_text()]
    assert offenders == [], f"use run_in_passing_thread (server/process/torch_threads.py) instead in {offenders}"
