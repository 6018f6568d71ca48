"""Errors the techniques raise, and the checks their configs share.

A config with a bad value raises ``ValueError`` when it is built (the search rejects it up front);
a valid config that cannot be applied to a particular model raises :class:`TechniqueError` when it
is applied (the search records the reason and goes on).
"""

from __future__ import annotations

import math


class TechniqueError(RuntimeError):
    """A technique cannot be applied to this model; the message names the layer or the reason."""


def first_line(error: BaseException | str) -> str:
    """The first non-empty line of an error (torch's exporters raise pages), for logs and report tables."""
    text = str(error).strip()
    if text:
        return text.splitlines()[0]
    return type(error).__name__ if isinstance(error, BaseException) else ""


def check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) in ``[low, high]``."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer in {bound}, got {value!r}")


def check_float(
    name: str, value: object, low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False
) -> None:
    """Raise ValueError unless ``value`` is a finite number in the interval from ``low`` to ``high``."""
    ok = False
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        bound = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {bound}, got {value!r}")
