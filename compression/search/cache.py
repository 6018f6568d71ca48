"""Content-addressed cache of search results: same inputs -> same key -> no recompression.

The key hashes everything that changes the outcome: the model's weights file, its deploy settings,
the compression settings, the device class (``cpu`` with the CPU instruction set, or the GPU model and
compute capability: compiled kernels are built for it), and library versions. A search writes into a
private temporary folder and publishes it with one atomic rename, so a process killed mid-search
leaves nothing a restart would load. A file lock makes two replicas starting together compress
once: the second waits, then loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from filelock import FileLock

from compression.runtimes.manifest import current_cpu_isa

REPORT_NAME = "report.json"
KEY_LENGTH = 16
PUBLISHED_MODE = 0o755
"""Published entries: readable by every user sharing the store, writable only by their builder."""
_VERSIONED = ("torch", "torchvision", "torchao", "torch-pruning", "onnxruntime", "onnx", "slimserve")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def accelerator_class(device: str) -> str | None:
    """The GPU model and compute capability behind a ``cuda[:N]`` device; None for the CPU.

    Kernels compiled (and latencies measured) on one GPU architecture do not carry over to another, so
    replicas on different GPU types get different artifacts.
    """
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return "cuda-unavailable"
    index = torch.device(device).index or 0
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} sm_{major}{minor}"


SEARCH_REVISION = 4
"""Bumped when the search itself changes what it would choose for the same inputs (2: honest selection, the
pruning-ratio search and the new default candidates; 3: pruned channels rounded to the nearest multiple of 8
on CPUs too, channel_prune's KD 1e-3 for up to 30 epochs; 4: channel_prune's KD at 3e-4 for up to 100
epochs with BatchNorm frozen, and ``budget.confidence`` a one-sided level), so results chosen by an older
search are searched again rather than served from the cache."""


def cache_key(
    *, model_file: Path | None, model_settings: dict[str, Any], compression_settings: dict[str, Any], device: str
) -> tuple[str, dict[str, Any]]:
    """The key and the inputs it was computed from (stored in the report for auditing)."""
    inputs = {
        "model_file_sha256": file_sha256(model_file) if model_file is not None else None,
        "model": model_settings,
        "compression": compression_settings,
        "device": device,
        "cpu_isa": current_cpu_isa(),
        "versions": library_versions(),
        "search_revision": SEARCH_REVISION,
    }
    if (accelerator := accelerator_class(device)) is not None:
        inputs["accelerator"] = accelerator  # only for GPUs, so CPU keys stay what they were
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:KEY_LENGTH], inputs


class ArtifactCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def entry(self, model_name: str, key: str) -> Path:
        return self.root / "compressed" / model_name / key

    def is_complete(self, model_name: str, key: str) -> bool:
        """Published entries always hold a report: it is written before the atomic rename."""
        return (self.entry(model_name, key) / REPORT_NAME).is_file()

    @contextmanager
    def lock(self, model_name: str, key: str) -> Iterator[None]:
        """Held while one process searches for ``key``; others block here, then find it complete."""
        entry = self.entry(model_name, key)
        entry.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(entry) + ".lock"):
            yield

    @contextmanager
    def staging(self, model_name: str, key: str) -> Iterator[Path]:
        """A private folder to build in; published atomically if the block completes, else removed.

        Call it while holding :meth:`lock` for the key: it removes the key's staging folders left behind
        by killed processes."""
        entry = self.entry(model_name, key)
        entry.parent.mkdir(parents=True, exist_ok=True)
        # NOTE: callers hold the key's lock, so leftovers are from a process killed mid-search.
        for stale in entry.parent.glob(f".{key}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.partial-", dir=entry.parent))
        try:
            yield staging
            _fsync_tree(staging)
            # NOTE: mkdtemp makes the folder private (0700); published, it must be readable by replicas
            # that share the store under another user.
            staging.chmod(PUBLISHED_MODE)
            if entry.exists():  # an unreadable or stale entry being replaced
                shutil.rmtree(entry)
            os.replace(staging, entry)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
