"""Rebuild the generated Python code in protos/ from the .proto files.

Run from the repository root:

    python -m protos.generate          # regenerate protos/*_pb2*.py and *.pyi
    python -m protos.generate --check  # exit 1 if the committed files are stale

Generation runs with the repository root as the import path, so
`protos/grpc_service.proto` imports `protos/model_config.proto` and the
generated modules import each other as `from protos import model_config_pb2`.
Generated files are never edited by hand.

The `_pb2.py` modules register their descriptors in slimserve's own pool,
`protos.DESCRIPTOR_POOL`, instead of protobuf's default pool (one rewrite of
protoc's output, below). The stock client `tritonclient.grpc` registers the same
`inference.*` names in the default pool, so without this the two could not be
imported into one process ("duplicate symbol 'inference.DataType'").

NOTE: the generated modules check at import time that the installed protobuf
and grpcio are at least the versions grpcio-tools generated them for, and
`--check` compares bytes, so regenerate with the pinned grpcio-tools.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

log = logging.getLogger("slimserve.protos")

REPO_ROOT = Path(__file__).resolve().parent.parent
# Suffixes of everything protoc writes for a .proto file.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
_SERVICE_RE = re.compile(r"^\s*service\s+\w+", re.MULTILINE)


def proto_files(root: Path = REPO_ROOT) -> list[Path]:
    """All .proto files in `root`/protos/, sorted by name."""
    return sorted((root / "protos").glob("*.proto"))


def _defines_service(proto: Path) -> bool:
    return bool(_SERVICE_RE.search(proto.read_text(encoding="utf-8")))


def _run_protoc(root: Path, args: list[str]) -> None:
    # NOTE: grpc_tools ships the well-known types (google/protobuf/*.proto);
    # its include dir is added so a future import of them resolves.
    well_known = str(resources.files("grpc_tools") / "_proto")
    argv = ["grpc_tools.protoc", f"-I{root}", f"-I{well_known}", *args]
    if protoc.main(argv) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(argv)}")


def generate(out_root: Path, root: Path = REPO_ROOT) -> list[Path]:
    """Compile `root`/protos/*.proto into `out_root`/protos/; return the files written.

    `_pb2_grpc.py` modules are written only for files that declare a service.
    """
    protos = proto_files(root)
    rel = [p.relative_to(root).as_posix() for p in protos]
    out_root.mkdir(parents=True, exist_ok=True)
    _run_protoc(root, [f"--python_out={out_root}", f"--pyi_out={out_root}", *rel])
    # NOTE: a separate run for services: grpc_python_out would otherwise also
    # write an empty model_config_pb2_grpc.py.
    services = [r for p, r in zip(protos, rel) if _defines_service(p)]
    if services:
        _run_protoc(root, [f"--grpc_python_out={out_root}", *services])
    for module in (out_root / "protos").glob("*_pb2.py"):
        _use_own_pool(module)
    return generated_files(out_root)


_DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
_OWN_POOL = "_protos_package.DESCRIPTOR_POOL.AddSerializedFile("


def _use_own_pool(module: Path) -> None:
    """Point a `_pb2.py` module at `protos.DESCRIPTOR_POOL` (see the module docstring)."""
    text = module.read_text(encoding="utf-8")
    if text.count(_DEFAULT_POOL) != 1:
        raise RuntimeError(f"{module.name}: protoc output changed shape; cannot redirect its descriptor pool")
    text = text.replace(_DEFAULT_POOL, _OWN_POOL)
    text = text.replace("\n_sym_db = ", "\nimport protos as _protos_package\n_sym_db = ", 1)
    module.write_text(text, encoding="utf-8")


def generated_files(root: Path = REPO_ROOT) -> list[Path]:
    """The generated files currently present in `root`/protos/."""
    return sorted(p for p in (root / "protos").iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def stale_files(root: Path = REPO_ROOT) -> list[str]:
    """Generated files in `root`/protos/ that are missing, extra or differ from a fresh build."""
    with tempfile.TemporaryDirectory(prefix="slimserve-protos-") as tmp:
        fresh = {p.name: p.read_bytes() for p in generate(Path(tmp), root)}
    current = {p.name: p.read_bytes() for p in generated_files(root)}
    problems = []
    for name in sorted(fresh.keys() | current.keys()):
        if name not in current:
            problems.append(f"{name} (missing)")
        elif name not in fresh:
            problems.append(f"{name} (no .proto generates it)")
        elif fresh[name] != current[name]:
            problems.append(f"{name} (differs)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.generate", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if protos/ holds stale generated files"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.check:
        problems = stale_files()
        if problems:
            log.error(
                "generated code in protos/ is out of date with the .proto files:\n  %s\n"
                "run `python -m protos.generate` and commit the result",
                "\n  ".join(problems),
            )
            return 1
        log.info("generated code in protos/ is up to date")
        return 0

    # NOTE: build in a temp dir first so a protoc error leaves protos/ intact.
    with tempfile.TemporaryDirectory(prefix="slimserve-protos-") as tmp:
        fresh = generate(Path(tmp))
        for old in generated_files():
            old.unlink()
        for path in fresh:
            shutil.copyfile(path, REPO_ROOT / "protos" / path.name)
    log.info("wrote %s", ", ".join(f"protos/{p.name}" for p in fresh))
    return 0


if __name__ == "__main__":
    sys.exit(main())
