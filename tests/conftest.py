from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from server.config.settings import DeployConfig, default_config
from tests.serving import ServerThread, running_server


def digits_without_compression() -> DeployConfig:
    """The bundled digits model as ``make serve`` serves it, minus the background compression search."""
    config = default_config()
    models = [m.model_copy(update={"compression": None}) for m in config.models]
    return config.model_copy(update={"models": models})


@pytest.fixture(scope="module")
def one_intra_op_thread() -> Iterator[None]:
    """One intra-op torch thread for a module's tests: tiny models gain nothing from two, and on a shared
    2-core machine two threads spin against other processes (measured 15x slower training). Use with
    ``pytestmark = pytest.mark.usefixtures("one_intra_op_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_server() -> Iterator[ServerThread]:
    """The bundled digits model on free loopback ports."""
    with running_server(digits_without_compression()) as server:
        yield server
