"""One verb for every technique: ``apply(model, config, ctx)`` dispatches on the config's type.

A technique is a frozen dataclass config (validated in ``__post_init__``, with a ``name`` class
variable) and a transform registered for that config type with :func:`register`. Transforms return
a new model and never mutate their input, because several candidates are built from one original.

A config field may itself be a frozen dataclass (the ``distillation`` block of the techniques that
train): :func:`config_from_dict` builds it from a mapping that overrides the field's default, so
``{distillation: {epochs: 3}}`` keeps the technique's own learning rate and time budget. A field that
moved into such a block is listed in the config's ``moved_fields`` class variable (``{old name:
"block.new name"}``), so a config written for the flat shape fails with a message saying what to write.
"""

from __future__ import annotations

import dataclasses
import json
import typing
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
    """Inverse of :func:`config_to_dict`; raises ValueError naming an unknown technique or field.

    Nested blocks are built over the field's default (see the module docstring); a field that moved
    into a block is refused with a message that shows the nested form.
    """
    fields = dict(data)
    name = fields.pop("technique", None)
    if name not in _CONFIG_TYPES:
        known = ", ".join(sorted(_CONFIG_TYPES)) or "none registered"
        raise ValueError(f"unknown technique {name!r} (known: {known})")
    config_type = _CONFIG_TYPES[name]
    _refuse_moved(name, getattr(config_type, "moved_fields", {}), fields)
    hints = typing.get_type_hints(config_type)
    for field in dataclasses.fields(config_type):
        block_type = hints.get(field.name)
        value = fields.get(field.name)
        if isinstance(value, dict) and isinstance(block_type, type) and dataclasses.is_dataclass(block_type):
            fields[field.name] = _block_from_dict(name, field, block_type, value)
    return config_type(**fields)


def _refuse_moved(name: str, moved: dict[str, str], fields: dict[str, Any]) -> None:
    """ValueError if ``fields`` uses a flat name that moved into a block, saying what to write instead."""
    old = [key for key in fields if key in moved]
    if not old:
        return
    blocks: dict[str, list[str]] = {}
    for key in old:
        block, new = moved[key].split(".", 1)
        blocks.setdefault(block, []).append(f"{new}: {json.dumps(fields[key], default=str)}")
    write = "; ".join(f"{block}: {{{', '.join(items)}}}" for block, items in blocks.items())
    raise ValueError(
        f"{name}: {', '.join(old)} moved into a nested block: write {write} "
        "(docs/compression.md, the distillation block)"
    )


def _block_from_dict(name: str, field: dataclasses.Field[Any], block_type: type, value: dict[str, Any]) -> Any:
    known = [f.name for f in dataclasses.fields(block_type) if f.init]
    unknown = [str(key) for key in value if key not in known]
    if unknown:
        raise ValueError(f"{name}: unknown field(s) in {field.name}: {', '.join(unknown)} (known: {', '.join(known)})")
    base: Any
    if isinstance(field.default, block_type):
        base = field.default
    elif field.default_factory is not dataclasses.MISSING:
        base = field.default_factory()
    else:
        base = block_type()
    try:
        return dataclasses.replace(base, **value)
    except ValueError as exc:
        raise ValueError(f"{name}: {field.name}: {exc}") from exc


def registered_names() -> list[str]:
    return sorted(_CONFIG_TYPES)
