from __future__ import annotations

from collections.abc import Iterator

import pytest

from server.settings import default_config
from tests.serving import ServerThread, running_server


@pytest.fixture(scope="session")
def digits_server() -> Iterator[ServerThread]:
    """The bundled digits model served as ``make serve`` would, on free loopback ports."""
    with running_server(default_config()) as server:
        yield server
