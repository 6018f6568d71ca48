"""glibc malloc thresholds for a process that handles megabyte-sized tensors on every request.

glibc serves an allocation above its mmap threshold (128 KiB, adapting upwards as such blocks are freed)
with a fresh ``mmap``, and gives freed memory at the top of a heap back to the kernel above its trim
threshold; every 4 KiB page of such a buffer then costs a page fault on its next use. A 602 KB request,
the batch stacked from several of them and a model's activations are exactly such buffers, allocated
and freed on every request. Raising both thresholds keeps them in the heap for reuse: measured with
``perf_analyzer -b 4`` on a model that costs microseconds, the build before and after in three
alternating pairs, +2 to +28% throughput and half the time to take a request in (docs/benchmarks.md, "The floor
under the overhead target").

Operators keep the last word: glibc's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
environment variables, when set, are left to stand.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("slimserve.allocator")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20
"""glibc's largest allowed mmap threshold on 64-bit (half its heap size): larger blocks are still mmapped."""
TRIM_THRESHOLD_BYTES = 64 << 20
"""Freed memory a heap may keep for reuse: a few batches of max_batch_size x 3x224x224 FP32."""
THRESHOLDS = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
OPERATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_large_buffers_in_heap() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; whether they were changed (not on
    another libc, nor when the operator set them through glibc's environment variables)."""
    if any(name in os.environ for name in OPERATOR_VARIABLES):
        log.info("malloc thresholds left as set in the environment (%s)", ", ".join(OPERATOR_VARIABLES))
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        log.debug("not glibc: malloc thresholds left at the C library's defaults")
        return False
    accepted = [libc.mallopt(option, value) == 1 for option, value in THRESHOLDS]
    changed = all(accepted)
    if not changed:
        log.warning("glibc refused the malloc thresholds; large buffers stay mmapped per use")
    return changed
