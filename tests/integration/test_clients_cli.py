"""slimserve's own client library and CLI against a real server, and the server CLI as a process."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from benchmarks.common import slimserve_process
from clients.cli import main as client_main
from clients.client import SlimserveClient
from compression.models.digits.data import encode_png, load_splits, normalize
from tests.serving import ServerThread


def test_client_library_classify_and_infer(digits_server: ServerThread) -> None:
    split = load_splits()["test"]
    with SlimserveClient(digits_server.address) as client:
        assert client.server_ready()
        response = client.classify([encode_png(image) for image in split.images[:8]], top_k=2)
        assert [r.classes[0].index for r in response.results] == list(split.labels[:8])
        logits = client.infer("digits", normalize(split.images[:4]))
        assert logits.shape == (4, 10) and list(logits.argmax(axis=1)) == list(split.labels[:4])
        with pytest.raises(grpc.RpcError) as info:
            client.infer("nope", normalize(split.images[:1]))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_client_cli_classify_and_bench(
    digits_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    split = load_splits()["test"]
    paths = []
    for i in range(3):
        path = tmp_path / f"digit{i}.png"
        path.write_bytes(encode_png(split.images[i]))
        paths.append(str(path))
    assert client_main(["classify", *paths, "--address", digits_server.address, "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    for line, label in zip(lines, split.labels[:3], strict=True):
        assert line.split(":")[1].split()[0] == str(label)
    args = ["bench", "--address", digits_server.address, "--concurrency", "4", "--duration", "1", "--warmup", "0.2"]
    assert client_main(args) == 0
    out = capsys.readouterr().out
    assert "p50" in out and "p99" in out
    assert client_main(["classify", paths[0], "--address", digits_server.address, "--model", "nope"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_command_runs_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "deploy.yaml"
    config.write_text(
        "models:\n  - {name: digits, source: {format: builtin}, labels: [0,1,2,3,4,5,6,7,8,9],\n"
        "     preprocessing: {channels: 1, resize: 28, crop: 28, mean: [0.1307], std: [0.3081]}}\n"
    )
    log = tmp_path / "server.log"
    with slimserve_process(config, log_path=log) as server:
        with SlimserveClient(server.address) as client:
            assert client.infer("digits", np.zeros((1, 1, 28, 28), np.float32)).shape == (1, 10)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
    text = log.read_text()
    assert "gRPC listening on 127.0.0.1:" in text and "ready: serving digits" in text and "stopped" in text


def test_invalid_config_fails_before_listening(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("models:\n  - {name: digits, source: {format: builtin}, batching: {max_batch_size: 0}}\n")
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "models.0.batching.max_batch_size" in result.stderr
