"""The ``manifest.json`` beside every realized artifact: what it is, what built it, and its hashes.

A restart loads the same files the measurement used; the sha256 of each file is checked on load so a
truncated copy or an edited file fails loudly instead of serving something that was never measured.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("slimserve.compression.realization")

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1

# NOTE: compiled CPU code is built with -march=native, so these flags decide where it can run.
_ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


class ArtifactError(RuntimeError):
    """An artifact directory that cannot be loaded as it is (missing, tampered, or built elsewhere)."""


@dataclass
class Manifest:
    runtime: str
    precision: str
    device_type: str
    input_shape: list[int]
    """Input shape without the batch dimension."""
    max_batch_size: int
    config: dict[str, Any]
    """The RealizationConfig as a dict."""
    files: dict[str, str] = field(default_factory=dict)
    """File name (relative to the artifact directory) -> sha256 hex digest."""
    versions: dict[str, str] = field(default_factory=dict)
    cpu_isa: list[str] = field(default_factory=list)
    float_layers: list[str] = field(default_factory=list)
    """int8 only: layers left in float by the sensitivity-guided fallback."""
    quantization: dict[str, Any] | None = None
    """int8 only: the scheme, whether activations use 7 bits (reduce_range), calibration size."""
    fallback: dict[str, Any] | None = None
    """int8 only, when a score function was given: the scores the fallback decision was based on."""
    build_seconds: float = 0.0
    format_version: int = FORMAT_VERSION

    def write(self, artifact_dir: Path) -> None:
        """Hash the files named in ``files`` and write ``manifest.json`` (written last, atomically)."""
        self.files = {name: sha256_file(artifact_dir / name) for name in sorted(self.files)}
        tmp = artifact_dir / (MANIFEST_NAME + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        tmp.replace(artifact_dir / MANIFEST_NAME)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def current_versions() -> dict[str, str]:
    import onnxruntime
    import torchao

    return {
        "torch": torch.__version__,
        "torchao": torchao.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def current_cpu_isa() -> list[str]:
    """The ISA flags of this CPU that compiled code may depend on (empty where /proc is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return [flag for flag in _ISA_FLAGS if flag in flags]
    return []


def read_manifest(artifact_dir: Path) -> Manifest:
    """Read ``manifest.json`` and verify every file's sha256; raises ArtifactError."""
    path = artifact_dir / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
        manifest = Manifest(**data)
    except FileNotFoundError:
        raise ArtifactError(f"{path} not found: {artifact_dir} is not a built artifact") from None
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"{path} is not a valid manifest: {exc}") from None
    if manifest.format_version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {manifest.format_version}, expected {FORMAT_VERSION}")
    if not manifest.files:
        raise ArtifactError(f"{path} lists no files")
    for name, expected in manifest.files.items():
        file = artifact_dir / name
        if not file.is_file():
            raise ArtifactError(f"artifact file {file} listed in the manifest is missing")
        actual = sha256_file(file)
        if actual != expected:
            raise ArtifactError(
                f"artifact file {file} does not match its manifest (sha256 {actual[:12]}..., "
                f"expected {expected[:12]}...): it changed after it was built and measured; rebuild it"
            )
    return manifest


def check_compatible(manifest: Manifest, device: torch.device, *, compiled: bool) -> None:
    """Refuse artifacts built for another device type, or compiled code this machine cannot run."""
    if manifest.device_type != device.type:
        raise ArtifactError(f"artifact was built for {manifest.device_type}, cannot load it on {device}")
    built_torch = manifest.versions.get("torch")
    if built_torch != torch.__version__:
        if compiled:
            raise ArtifactError(
                f"compiled artifact was built with torch {built_torch}, this is torch {torch.__version__}"
            )
        log.warning("artifact built with torch %s, loading with torch %s", built_torch, torch.__version__)
    if compiled and device.type == "cpu":
        missing = sorted(set(manifest.cpu_isa) - set(current_cpu_isa()))
        if missing:
            raise ArtifactError(f"compiled artifact needs CPU features this machine lacks: {', '.join(missing)}")
