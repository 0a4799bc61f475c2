"""Trace-time argument validation shared by the loss kernels (shapes are static under jit)."""
from __future__ import annotations

from collections.abc import Iterable


def check_2d(**arrays) -> tuple[int, int]:
    """All named arrays must be 2-D ``[batch, time]`` with one common shape; returns it."""
    shape = None
    first = None
    for name, x in arrays.items():
        if x is None:
            continue
        if getattr(x, "ndim", None) != 2:
            raise ValueError(f"{name} must be a 2-D [batch, time] array, got shape {getattr(x, 'shape', None)}")
        if shape is None:
            shape, first = tuple(x.shape), name
        elif tuple(x.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but {first} has shape {shape}; they must match")
    return shape


def check_choice(name: str, value: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def check_clip(clip_low: float, clip_high: float, *, low_max: float = 1.0) -> None:
    if not 0.0 <= clip_low <= low_max:
        raise ValueError(f"clip_low must be in [0, {low_max}], got {clip_low}")
    if not clip_high >= 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
