"""Compress once, serve many: one ``slimserve compress``, then two ``slimserve serve`` processes sharing
its artifact store (as the Kubernetes Job and Deployment replicas do through a ReadWriteMany volume)."""

from __future__ import annotations

import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
import yaml

from benchmarks.common import REPO_ROOT, slimserve_process
from compression.models.digits.data import load_splits, normalize
from tests.compressed_digits import CHOSEN, digits_config, seed_trained_digits

pytestmark = pytest.mark.slow

IMAGES = 40


def store_snapshot(store: Path) -> dict[str, int]:
    """Every file and folder of the compressed-artifact store, with its modification time."""
    return {str(p.relative_to(store)): p.stat().st_mtime_ns for p in (store / "compressed").rglob("*")}


def compress_once(config_path: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "compress", "--config", str(config_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


def infer(client: triton.InferenceServerClient, images: np.ndarray) -> tuple[str, np.ndarray]:
    tensor = triton.InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    result = client.infer("digits", [tensor])
    return result.get_response().model_version, result.as_numpy("logits")


def test_two_replicas_serve_the_artifact_compressed_once(tmp_path: Path) -> None:
    store = tmp_path / "store"
    seed_trained_digits(store)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(digits_config(store).model_dump(mode="json")))

    assert f"chose {CHOSEN}" in compress_once(config_path)
    published = [p for p in (store / "compressed" / "digits").iterdir() if p.is_dir()]
    assert len(published) == 1
    before = store_snapshot(store)

    split = load_splits()["test"]
    images, labels = normalize(split.images[:IMAGES]), split.labels[:IMAGES]
    logs = [tmp_path / "replica-a.log", tmp_path / "replica-b.log"]
    with ExitStack() as stack:
        replicas = [stack.enter_context(slimserve_process(config_path, log_path=log)) for log in logs]
        assert replicas[0].address != replicas[1].address
        clients = [triton.InferenceServerClient(r.address) for r in replicas]

        configs = [client.get_model_config("digits").config.parameters for client in clients]
        for parameters in configs:
            assert parameters["default_variant"].string_value == CHOSEN
            assert parameters["report"].string_value == str(published[0] / "report.md")  # the one shared entry
        versions = [sorted(client.get_model_metadata("digits").versions) for client in clients]
        assert versions[0] == versions[1] == ["1", "2"]

        # round robin, one image per request, alternating replicas
        answered: dict[int, list[bool]] = {0: [], 1: []}
        for i in range(IMAGES):
            version, logits = infer(clients[i % 2], images[i : i + 1])
            assert version == CHOSEN
            answered[i % 2].append(bool(logits.argmax() == labels[i]))
        for replica, correct in answered.items():
            assert np.mean(correct) >= 0.9, f"replica {replica}: {np.mean(correct):.0%} correct"
        # one artifact: both replicas compute the same logits for the same batch
        _, logits_a = infer(clients[0], images[:8])
        _, logits_b = infer(clients[1], images[:8])
        np.testing.assert_allclose(logits_a, logits_b, rtol=1e-5, atol=1e-5)

    assert store_snapshot(store) == before  # neither replica searched, wrote or replaced anything
    for log in logs:
        text = log.read_text()
        assert "compressed result found in the cache" in text, text[-2000:]
        assert "no cached compression result" not in text and "searching" not in text
