"""Every deploy config shipped in deploy/examples is valid (so the docs that point at them stay true).

The Kubernetes ConfigMap's embedded config is checked by tests/unit/deploy/test_manifests.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config.settings import load_config
from tests import REPO_ROOT

CONFIGS = sorted((REPO_ROOT / "deploy" / "examples").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_valid(path: Path) -> None:
    config = load_config(path)
    assert config.models


def test_examples_exist() -> None:
    assert {"digits.yaml", "resnet18.yaml"} <= {p.name for p in CONFIGS}
