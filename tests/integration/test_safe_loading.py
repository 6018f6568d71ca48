"""Safe loading: weights are read with ``weights_only=True``; a whole pickled model loads only when the
config trusts that file, and an untrusted pickle never gets to run its code."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.client import SlimserveClient
from compression.models.loading import ModelLoadError, load_model
from server.config.settings import ConfigError, load_config
from tests.models import OddNet
from tests.serving import running_server

MODEL = "{name: odd, labels: [a, b, c, d, e, f, g, h, i, j], preprocessing: {channels: 1, resize: 28, crop: 28,"
MODEL += " mean: [0.5], std: [0.5]}, source: SOURCE}"


class RunsCode:
    """Unpickling this creates ``marker``: stands for any code a hostile pickle would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.makedirs, (str(self.marker),)


def config_file(folder: Path, source: str) -> Path:
    path = folder / "deploy.yaml"
    path.write_text("models:\n  - " + MODEL.replace("SOURCE", source) + "\n")
    return path


@pytest.fixture
def pickled(tmp_path: Path) -> tuple[Path, OddNet]:
    """A real whole-module pickle, as ``torch.save(model)`` writes it."""
    torch.manual_seed(0)
    model = OddNet(in_channels=1, num_classes=10).eval()
    torch.save(model, tmp_path / "model.pt")
    return tmp_path / "model.pt", model


def test_a_pickled_model_is_refused_unless_the_config_trusts_it(tmp_path: Path, pickled: tuple[Path, OddNet]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(config_file(tmp_path, "{format: pickle, path: model.pt}"))
    message = str(info.value)
    assert "models.0.source.pickle" in message and "refusing to unpickle model.pt" in message
    assert "trust_pickle: true" in message


def test_a_trusted_pickled_model_is_served(tmp_path: Path, pickled: tuple[Path, OddNet]) -> None:
    path, model = pickled
    config = load_config(config_file(tmp_path, "{format: pickle, path: model.pt, trust_pickle: true}"))
    images = np.random.default_rng(0).standard_normal((2, 1, 28, 28), dtype=np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(images)).numpy()
    with running_server(config) as server:
        with SlimserveClient(server.address, timeout=20) as client:
            np.testing.assert_allclose(client.infer("odd", images), expected, rtol=1e-4, atol=1e-5)


def test_a_pickled_model_given_as_weights_is_refused_by_weights_only(
    tmp_path: Path, pickled: tuple[Path, OddNet]
) -> None:
    source = "{format: python, factory: 'tests.models:OddNet', kwargs: {in_channels: 1, num_classes: 10}, "
    config = load_config(config_file(tmp_path, source + "weights: model.pt}"))
    with pytest.raises(ModelLoadError) as info:
        load_model(config.models[0], tmp_path)
    assert "weights_only=True" in str(info.value) and "trust_pickle: true" in str(info.value)


def test_an_untrusted_pickle_never_runs_its_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"weight": RunsCode(marker)}, tmp_path / "evil.pt")
    source = "{format: torchvision, architecture: resnet18, num_classes: 10, weights: evil.pt}"
    config = load_config(config_file(tmp_path, source))
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        load_model(config.models[0], tmp_path)
    with pytest.raises(ConfigError):
        load_config(config_file(tmp_path, "{format: pickle, path: evil.pt}"))
    assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)  # what trust_pickle would do: the code runs
    assert marker.exists()
