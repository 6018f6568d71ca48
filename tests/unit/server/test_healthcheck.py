"""``python -m server.healthcheck`` probes where the deploy config says the server listens."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.healthcheck import probe_address


@pytest.mark.parametrize(
    ("server", "address"),
    [
        ("", "127.0.0.1:8001"),
        ("server: {grpc_port: 9001}", "127.0.0.1:9001"),
        ("server: {host: 0.0.0.0, grpc_port: 9001}", "127.0.0.1:9001"),
        ("server: {host: '::', grpc_port: 9001}", "127.0.0.1:9001"),
        ("server: {host: 10.1.2.3}", "10.1.2.3:8001"),
        ("server: {host: '::1', grpc_port: 9001}", "[::1]:9001"),
    ],
)
def test_probe_address_follows_the_config(server: str, address: str, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"{server}\nmodels: [{{name: digits, source: {{format: builtin}}}}]\n")
    assert probe_address(config) == address


def test_without_a_config_it_probes_the_default_port() -> None:
    assert probe_address(None) == "127.0.0.1:8001"
