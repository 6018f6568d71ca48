"""An invalid deploy config stops ``slimserve serve`` before anything listens, with a message that names
the field and the fix; the process exits 2."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import REPO_ROOT, free_port
from server import cli

MODEL = "models:\n  - {name: digits, source: {format: builtin}}\n"
TOKENS_ENV = "SLIMSERVE_TEST_TOKENS_NOT_SET"

CASES = [
    ("typo", "server: {grpc_prot: 9000}\n" + MODEL, "server.grpc_prot: unknown field: remove it or fix its spelling"),
    (
        "cert without key",
        "server: {tls: {cert_file: server.pem}}\n" + MODEL,
        "server.tls: cert_file is set but key_file is not: give both (PEM certificate and its key) or neither",
    ),
    (
        "missing certificate file",
        "server: {tls: {cert_file: absent.pem, key_file: absent.key}}\n" + MODEL,
        "server.tls.cert_file: file FOLDER/absent.pem does not exist; fix the path",
    ),
    (
        "tokens variable not set",
        f"server: {{auth: {{tokens_env: {TOKENS_ENV}}}}}\n" + MODEL,
        f"server.auth: no tokens found in ${TOKENS_ENV}; add at least one token",
    ),
    (
        "empty tokens file",
        "server: {auth: {tokens_file: tokens.txt}}\n" + MODEL,
        "server.auth: no tokens found in file FOLDER/tokens.txt",
    ),
    (
        "image format",
        "server: {allowed_image_formats: [JPEG, HEIC]}\n" + MODEL,
        "server.allowed_image_formats.1: Input should be 'JPEG', 'PNG', 'WEBP', 'BMP', 'GIF' or 'TIFF'",
    ),
    (
        "untrusted pickle",
        "models:\n  - {name: m, source: {format: pickle, path: m.pt}}\n",
        "models.0.source.pickle: refusing to unpickle m.pt",
    ),
    (
        "batch size",
        "models:\n  - {name: m, source: {format: builtin}, batching: {max_batch_size: 0}}\n",
        "models.0.batching.max_batch_size: Input should be greater than or equal to 1",
    ),
]


def bad_config(folder: Path, text: str) -> Path:
    (folder / "server.pem").write_text("not read: the key is missing\n")
    (folder / "tokens.txt").write_text("# no tokens yet\n\n")
    path = folder / "deploy.yaml"
    path.write_text(text)
    return path


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize(("text", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_serve_refuses_an_invalid_config_before_listening(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    monkeypatch.delenv(TOKENS_ENV, raising=False)
    port = free_port()
    argv = ["serve", "--config", str(bad_config(tmp_path, text)), "--host", "127.0.0.1", "--grpc-port", str(port)]
    with caplog.at_level(logging.INFO):
        assert cli.main([*argv, "--http-port", str(free_port()), "--metrics-port", str(free_port())]) == 2
    logged = caplog.text
    assert message.replace("FOLDER", str(tmp_path)) in logged, logged
    assert "listening" not in logged and port_is_free(port)


def test_the_real_command_exits_2_with_the_message(tmp_path: Path) -> None:
    config = bad_config(tmp_path, "server: {tls: {cert_file: server.pem}}\n" + MODEL)
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "serve", "--config", str(config), "--grpc-port", str(port)]
    command += ["--http-port", str(free_port())]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert f"invalid deploy config {config}:\n  server.tls: cert_file is set but key_file is not" in done.stderr
    assert "listening" not in done.stderr and port_is_free(port)
