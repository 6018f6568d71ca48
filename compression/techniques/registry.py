"""One verb for every technique: ``apply(model, config, ctx)`` dispatches on the config's type.

A technique is a frozen dataclass config (validated in ``__post_init__``, with a ``name`` class
variable) and a transform registered for that config type with :func:`register`. Transforms return
a new model and never mutate their input, because several candidates are built from one original.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Protocol, TypeVar

from torch import nn

from compression.context import CompressionContext


class TechniqueConfig(Protocol):
    name: ClassVar[str]


ConfigT = TypeVar("ConfigT")
Transform = Callable[[nn.Module, Any, CompressionContext], nn.Module]

_TRANSFORMS: dict[type, Transform] = {}
_CONFIG_TYPES: dict[str, type] = {}


def register(
    config_type: type[ConfigT],
) -> Callable[[Callable[[nn.Module, ConfigT, CompressionContext], nn.Module]], Any]:
    """Register ``transform`` as the implementation of ``config_type``."""

    def decorator(transform: Callable[[nn.Module, ConfigT, CompressionContext], nn.Module]) -> Any:
        name = config_type.name  # type: ignore[attr-defined]
        if name in _CONFIG_TYPES and _CONFIG_TYPES[name] is not config_type:
            raise ValueError(f"technique name {name!r} registered twice")
        _TRANSFORMS[config_type] = transform
        _CONFIG_TYPES[name] = config_type
        return transform

    return decorator


def apply(model: nn.Module, config: Any, ctx: CompressionContext) -> nn.Module:
    """Apply the technique that ``config`` describes; returns a new model."""
    try:
        transform = _TRANSFORMS[type(config)]
    except KeyError:
        raise TypeError(f"no technique registered for {type(config).__name__}") from None
    result = transform(model, config, ctx)
    if result is model:
        raise RuntimeError(f"technique {config.name!r} returned its input instead of a new model")
    return result


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready form: ``{"technique": name, **fields}``."""
    return {"technique": config.name, **dataclasses.asdict(config)}


def config_from_dict(data: dict[str, Any]) -> Any:
    """Inverse of :func:`config_to_dict`; raises ValueError naming an unknown technique."""
    fields = dict(data)
    name = fields.pop("technique", None)
    if name not in _CONFIG_TYPES:
        known = ", ".join(sorted(_CONFIG_TYPES)) or "none registered"
        raise ValueError(f"unknown technique {name!r} (known: {known})")
    return _CONFIG_TYPES[name](**fields)


def registered_names() -> list[str]:
    return sorted(_CONFIG_TYPES)
