from __future__ import annotations

from pathlib import Path

import pytest

from compression.models.settings import TorchvisionSource
from server.config.settings import ConfigError, default_config, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "deploy.yaml"
    path.write_text(text)
    return path


def test_default_config_serves_digits() -> None:
    config = default_config()
    assert [m.name for m in config.models] == ["digits"]
    assert config.server.grpc_port == 8001 and config.server.metrics_port == 8002
    assert config.models[0].preprocessing.channels == 1
    assert config.server.max_message_bytes > 4 * 1024 * 1024


def test_relative_paths_resolve_against_config_folder(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
models:
  - name: net
    source: {format: torchvision, architecture: resnet18, weights: weights/r18.pt}
    labels_file: labels.txt
""",
    )
    model = load_config(path).models[0]
    assert isinstance(model.source, TorchvisionSource)
    assert model.source.weights == tmp_path / "weights" / "r18.pt"
    assert model.labels_file == tmp_path / "labels.txt"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("models: []", "models"),
        ("models:\n  - name: a\n    source: {format: onnx, path: x}", "models.0.source"),
        (
            "models:\n  - {name: a, source: {format: builtin}, batching: {max_batch_size: 0}}",
            "models.0.batching.max_batch_size",
        ),
        ("models:\n  - {name: a, source: {format: builtin}, devise: cpu}", "models.0.devise"),
        ("models:\n  - {name: a, source: {format: builtin}, device: tpu}", "models.0.device"),
        ("models:\n  - {name: a, source: {format: builtin}}\n  - {name: a, source: {format: builtin}}", "unique"),
        ("models:\n  - {name: a, source: {format: builtin}, preprocessing: {channels: 1}}", "mean and std"),
        ("server: {grpc_port: 70000}\nmodels:\n  - {name: a, source: {format: builtin}}", "server.grpc_port"),
        ("- just a list", "mapping"),
        ("models: [unclosed", "not valid YAML"),
    ],
)
def test_invalid_configs_name_the_field(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert fragment in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read deploy config"):
        load_config(tmp_path / "absent.yaml")
