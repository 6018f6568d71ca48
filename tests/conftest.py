from __future__ import annotations

from collections.abc import Iterator

import pytest

from server.config.settings import DeployConfig, default_config
from tests.serving import ServerThread, running_server


def digits_without_compression() -> DeployConfig:
    """The bundled digits model as ``make serve`` serves it, minus the background compression search."""
    config = default_config()
    models = [m.model_copy(update={"compression": None}) for m in config.models]
    return config.model_copy(update={"models": models})


@pytest.fixture(scope="session")
def digits_server() -> Iterator[ServerThread]:
    """The bundled digits model on free loopback ports."""
    with running_server(digits_without_compression()) as server:
        yield server
