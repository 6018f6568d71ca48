"""Torch work off the inference thread runs on a thread that exits afterwards.

OpenMP (libgomp, which torch uses on the CPU) keeps a team of worker threads for every thread that has
run a parallel region, for as long as that thread lives. Once the process holds more such threads than
cores, the workers stop spinning at the barriers between parallel regions and sleep instead, and every
forward pass on the inference thread pays the wake-ups: measured on the 2-core machine, a resnet18 batch
of 1 took 62-70 ms instead of 43-49 ms after one other long-lived thread (asyncio's default executor)
had run a forward pass to load the model. A thread that exits takes its team with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


async def run_in_passing_thread(function: Callable[..., T], *args: object) -> T:
    """``function(*args)`` on a new thread that ends when it returns (use instead of ``asyncio.to_thread``
    for anything that may run torch ops: loading, probing, hashing tensors)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-once")
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, function, *args)
    finally:
        pool.shutdown(wait=False)
