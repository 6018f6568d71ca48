"""server.process.allocator: request-sized buffers come from the heap, and the operator's glibc settings win.

Each case runs in a fresh interpreter: glibc adapts its mmap threshold to what a process has freed
before, so only a new process shows what the thresholds alone do.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

from server.process.allocator import MMAP_THRESHOLD_BYTES

pytestmark = pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc >= 2.33 (mallinfo2)")

PROBE = """
import ctypes, json, sys
from server.process.allocator import keep_large_buffers_in_heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
applied = keep_large_buffers_in_heap() if sys.argv[1] == "apply" else None

def mmapped_while_allocated(size):
    before = libc.mallinfo2().hblks
    block = libc.malloc(size)
    during = libc.mallinfo2().hblks
    libc.free(block)
    return during > before

sizes = [int(s) for s in sys.argv[2:]]
print(json.dumps({"applied": applied, "mmapped": [mmapped_while_allocated(s) for s in sizes]}))
"""

BATCH_BYTES = 16 * 3 * 224 * 224 * 4  # a stacked batch of 16 ImageNet-sized FP32 requests: 9.6 MB


def probe(mode: str, *sizes: int, env: dict[str, str] | None = None) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode, *map(str, sizes)],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_glibc_defaults_mmap_a_batch_sized_buffer() -> None:
    """The problem the module solves (and proof that the probe can see it)."""
    assert probe("default", BATCH_BYTES) == {"applied": None, "mmapped": [True]}


def test_batch_sized_buffers_come_from_the_heap_up_to_the_threshold() -> None:
    result = probe("apply", BATCH_BYTES, 2 * MMAP_THRESHOLD_BYTES)
    assert result == {"applied": True, "mmapped": [False, True]}


def test_the_operators_glibc_variables_are_left_to_stand() -> None:
    result = probe("apply", BATCH_BYTES, env={"MALLOC_MMAP_THRESHOLD_": str(128 << 10)})
    assert result == {"applied": False, "mmapped": [True]}
