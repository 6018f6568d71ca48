"""Servers in their own processes on free loopback ports. Standard library only: benchmarks that run in
another virtual environment (``http_frameworks`` in ``build/bench-http``) import it too."""

from __future__ import annotations

import multiprocessing
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def spawned_server(target: Callable[[str, int], None], name: str, timeout_s: float = 60) -> Iterator[tuple[int, int]]:
    """``target(name, port)`` in a fresh (spawned) process on a free loopback port; yields (port, pid) once
    the port accepts connections, and terminates the process when the block ends."""
    port = free_port()
    process = multiprocessing.get_context("spawn").Process(target=target, args=(name, port), daemon=True)
    process.start()
    try:
        deadline = time.monotonic() + timeout_s
        while True:  # listening yet?
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or not process.is_alive():
                    raise RuntimeError(f"the {name} server did not start") from None
                time.sleep(0.1)
        assert process.pid is not None
        yield port, process.pid
    finally:
        process.terminate()
        process.join(10)
