"""Crash safety of deploy-time compression, with real processes on the digits model.

* ``kill -9`` in the middle of ``slimserve compress`` leaves nothing that loads; the rerun searches
  again and publishes the same result as an uninterrupted run.
* A cached artifact whose bytes changed fails its sha256 check: a restarted server serves the
  original meanwhile, recompresses, and then serves the rebuilt (identical) artifact.
* Two ``slimserve serve`` replicas started together on one empty cache compress once: the other
  waits on the lock and loads the published result.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

from benchmarks.common import REPO_ROOT, slimserve_process, wait_ready
from compression.models.loading import LoadedModel, load_model
from compression.search.pipeline import cached_entry, compression_key
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from server.config.settings import DeployConfig
from tests.integration.test_hot_swap import CHOSEN, digits_config, seed_trained_digits
from tests.serving import running_server

pytestmark = pytest.mark.slow

SEARCHING = "searching (cache key"
CACHE_HIT = "no search needed"


@dataclass(frozen=True)
class Result:
    chosen: str
    files: dict[str, str]
    """The chosen artifact's file name -> sha256, from its manifest."""


def prepare(cache_dir: Path) -> Path:
    """A cache with the trained digits weights and no compression result; returns the deploy config file."""
    seed_trained_digits(cache_dir)
    path = cache_dir / "deploy.yaml"
    path.write_text(yaml.safe_dump(digits_config(cache_dir).model_dump(mode="json")))
    return path


def compress_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "server.cli", "compress", "--config", str(config)]


def loaded_digits(config: DeployConfig) -> LoadedModel:
    return load_model(config.models[0], config.resolved_cache_dir())


def published(cache_dir: Path) -> Result | None:
    """What the cache would serve for the digits config, or None (missing or failing verification)."""
    config = digits_config(cache_dir)
    entry = cached_entry(config.models[0], loaded_digits(config), cache_dir)
    if entry is None:
        return None
    assert entry.chosen_artifact is not None
    manifest = json.loads((entry.chosen_artifact / "manifest.json").read_text())
    return Result(entry.report.chosen, manifest["files"])


def entry_folder(cache_dir: Path) -> Path:
    config = digits_config(cache_dir)
    key, _ = compression_key(config.models[0], loaded_digits(config))
    return cache_dir / "compressed" / "digits" / key


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    """An uninterrupted ``slimserve compress`` run: its cache folder and what it published."""
    cache_dir = tmp_path_factory.mktemp("reference")
    subprocess.run(compress_command(prepare(cache_dir)), cwd=REPO_ROOT, check=True, timeout=900)
    result = published(cache_dir)
    assert result is not None and result.chosen == CHOSEN
    return cache_dir, result


def test_kill_9_mid_search_leaves_nothing_loadable_and_the_rerun_matches(
    tmp_path: Path, reference: tuple[Path, Result]
) -> None:
    config = prepare(tmp_path)
    parent = entry_folder(tmp_path).parent
    with open(tmp_path / "killed.log", "wb") as log:
        process = subprocess.Popen(compress_command(config), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        # mid-search: the candidate's artifact is written in the staging folder; measuring it takes seconds more
        deadline = time.monotonic() + 600
        while not list(parent.glob(".*.partial-*/**/model.onnx")):
            assert process.poll() is None, "compress ended before it was killed"
            assert time.monotonic() < deadline, "the search never reached the candidate's artifact"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert list(parent.glob(".*.partial-*")), "the killed search left its staging folder"
    assert not entry_folder(tmp_path).exists() and published(tmp_path) is None  # nothing a restart would load

    rerun = subprocess.run(compress_command(config), cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert SEARCHING in rerun.stderr  # the partial folder was not taken for a result
    assert published(tmp_path) == reference[1]  # same choice, byte-identical artifact
    assert not list(parent.glob(".*.partial-*"))  # the rerun cleared the killed run's leftovers


def test_a_corrupt_cached_artifact_is_recompressed_not_served(tmp_path: Path, reference: tuple[Path, Result]) -> None:
    shutil.copytree(reference[0], tmp_path, dirs_exist_ok=True)
    artifact = next(entry_folder(tmp_path).rglob("model.onnx"))
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit flipped
    artifact.write_bytes(bytes(data))
    assert published(tmp_path) is None  # fails its sha256 check

    with running_server(digits_config(tmp_path)) as server:
        model = server.server.registry.get("digits")
        assert model.default_variant == "original" and CHOSEN not in model.variants
        assert server.server.compressed.searching  # rebuilding in a child process
        server.call(server.server.compressed.wait())
        assert model.default_variant == CHOSEN
    assert published(tmp_path) == reference[1]


def test_two_replicas_on_one_empty_cache_compress_once(tmp_path: Path, reference: tuple[Path, Result]) -> None:
    config = prepare(tmp_path)
    logs = [tmp_path / "replica-a.log", tmp_path / "replica-b.log"]
    with ExitStack() as stack:
        replicas = [stack.enter_context(slimserve_process(config, log_path=log, wait=False)) for log in logs]
        for replica in replicas:
            wait_ready(replica.address, replica.process, 900)
        for replica in replicas:
            wait_for_default_variant(replica.address, CHOSEN, timeout_s=900)
    text = "".join(log.read_text() for log in logs)
    assert text.count(SEARCHING) == 1, text[-3000:]
    assert text.count(CACHE_HIT) == 1  # the other replica's search waited on the lock, then loaded
    assert published(tmp_path) == reference[1]


def wait_for_default_variant(address: str, variant: str, *, timeout_s: float) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        config = stub.ModelConfig(pb.ModelConfigRequest(name="digits"), timeout=10).config
        if config.parameters["default_variant"].string_value == variant:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{address} never served {variant!r}")
