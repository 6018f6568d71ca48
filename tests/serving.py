"""A real slimserve server on free loopback ports, running on its own event loop thread."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prometheus_client.parser import text_string_to_metric_families

from server.app import SlimServer
from server.config.settings import DeployConfig, ServerSettings


def loopback(config: DeployConfig) -> DeployConfig:
    """``config`` listening on 127.0.0.1 with OS-chosen ports (no port races between tests)."""
    server = ServerSettings.model_validate(
        {**config.server.model_dump(), "host": "127.0.0.1", "grpc_port": 0, "http_port": 0, "metrics_port": 0}
    )
    return config.model_copy(update={"server": server})


class ServerThread:
    """Runs ``SlimServer`` on an event loop in a background thread, so sync clients can call it."""

    def __init__(self, config: DeployConfig) -> None:
        self.server = SlimServer(loopback(config))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="slimserve-test", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def http_address(self) -> str:
        """host:port of the KServe v2 REST endpoint."""
        return f"127.0.0.1:{self.server.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def call(self, coroutine: object, timeout: float = 600) -> object:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)  # type: ignore[arg-type]

    def start(self) -> None:
        self._thread.start()
        self.call(self.server.start())

    def stop(self) -> None:
        try:
            self.call(self.server.stop(grace_s=5))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()


@contextmanager
def running_server(config: DeployConfig) -> Iterator[ServerThread]:
    thread = ServerThread(config)
    thread.start()
    try:
        yield thread
    finally:
        thread.stop()


def scrape(server: ServerThread) -> dict[str, list]:
    """The server's /metrics, parsed: family name -> samples."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def sample_value(samples: list, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def eventually(
    condition: Callable[[], bool], timeout: float = 30, *, retry_on: tuple[type[Exception], ...] = ()
) -> None:
    """Poll ``condition`` until it holds (failing the test after ``timeout`` seconds); exceptions of the
    ``retry_on`` types count as "not yet" (a server still starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except retry_on:
            pass
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {condition}"
        time.sleep(0.05)
