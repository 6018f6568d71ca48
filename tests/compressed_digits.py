"""The digits model with a one-candidate compression search: a real, quick compressed variant for tests."""

from __future__ import annotations

import shutil
from pathlib import Path

from compression.models.digits.model import ensure_trained
from compression.search.settings import CompressionSettings
from server.config.settings import DeployConfig, default_config

CHOSEN = "int8-onnxruntime"


def seed_trained_digits(cache_dir: Path) -> None:
    """Copy the already trained digits weights, so only the compression cache starts empty."""
    weights = ensure_trained()
    (cache_dir / "digits").mkdir(parents=True)
    shutil.copy(weights, cache_dir / "digits" / weights.name)


def digits_config(cache_dir: Path, **model_fields: object) -> DeployConfig:
    """Digits with a one-candidate search, caching under ``cache_dir``; ``model_fields`` override settings."""
    compression = CompressionSettings.model_validate(
        {
            # NOTE: the whole 500-image validation split, and 2 points: int8 must be shown within the budget by
            # the upper end of its interval on each 250-image half (honest selection), not by a point estimate.
            "budget": {"max_latency_ms": 50, "max_accuracy_drop": 2.0},
            "data": {"calibration_size": 256, "validation_size": 500},
            "measurement": {"warmup": 3, "iterations": 20},
            "candidates": [{"name": CHOSEN, "realization": {"runtime": "onnxruntime", "precision": "int8"}}],
        }
    )
    config = default_config()
    model = config.models[0].model_copy(update={"compression": compression, **model_fields})
    return config.model_copy(update={"models": [model], "cache_dir": cache_dir})
