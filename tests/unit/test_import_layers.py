"""The import layers (pyproject.toml [tool.importlinter], docs/architecture.md) hold, and the check bites."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import REPO_ROOT

ROOT = REPO_ROOT
PACKAGES = ("server", "compression", "clients", "protos")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=tree, capture_output=True, text=True, timeout=120, check=False
    )


def copy_of_tree(tmp_path: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_source_tree_keeps_every_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    "module,statement,broken",
    [
        ("compression/search/cache.py", "import server.app", "serving uses the compression library"),
        ("compression/models/loading.py", "from compression.search import pipeline", "compression: search"),
        ("clients/codec.py", "import compression.models.images", "clients depend on the protocol only"),
        ("server/variants/registry.py", "from server.transport import rpc", "server: app and CLIs"),
    ],
)
def test_an_upward_import_fails_the_check(tmp_path: Path, module: str, statement: str, broken: str) -> None:
    tree = copy_of_tree(tmp_path)
    path = tree / module
    path.write_text(path.read_text() + f"\n{statement}  # noqa\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    _, _, broken_section = result.stdout.partition("Broken contracts")
    assert broken in broken_section
