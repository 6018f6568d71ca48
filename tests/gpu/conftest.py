"""GPU tests: they run where torch sees a CUDA device; elsewhere each one is reported skipped, with the reason.

Every test in this folder is also marked ``gpu`` (``-m "not gpu"`` deselects them). Nothing here
touches CUDA at import or collection time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.config.settings import DeployConfig, ModelSettings, default_config
from tests.compressed_digits import seed_trained_digits

HERE = Path(__file__).resolve().parent
REASON = "needs a CUDA device"


@pytest.hookimpl(tryfirst=True)  # NOTE: before `-m` selection reads the markers added here
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # NOTE: a folder conftest's hook sees every collected item of the session, hence the path filter.
    available = torch.cuda.is_available()
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if not available:
                item.add_marker(pytest.mark.skip(reason=REASON))


def digits_on(device: str, cache_dir: Path, **fields: object) -> DeployConfig:
    """The bundled digits model served on ``device`` (validated, so GPU batching defaults apply)."""
    digits = default_config().models[0]
    data = {**digits.model_dump(exclude={"batching", "compression"}), "device": device, **fields}
    return DeployConfig(models=[ModelSettings.model_validate(data)], cache_dir=cache_dir)


@pytest.fixture(scope="session")
def gpu_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder with the trained digits weights (trained once per machine) and nothing compressed."""
    cache = tmp_path_factory.mktemp("gpu-cache")
    seed_trained_digits(cache)
    return cache
