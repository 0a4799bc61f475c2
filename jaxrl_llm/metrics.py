"""Evaluation metrics that are not losses: unbiased pass@k and small summary helpers."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

__all__ = ["pass_at_k", "mean_pass_at_k", "summarize"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct (Chen et al., 2021).

    pass@k = 1 - C(n - c, k) / C(n, k): the probability that a uniformly chosen size-k subset of the n samples
    contains at least one correct one. Requires ``1 <= k <= n`` and ``0 <= c <= n``.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    # product form of C(n-c, k) / C(n, k), stable for large n
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(correct: np.ndarray, ks: Iterable[int]) -> dict[int, float]:
    """Mean pass@k over problems. ``correct`` is a bool/0-1 array ``[num_problems, n]``."""
    correct = np.asarray(correct)
    if correct.ndim != 2:
        raise ValueError(f"correct must be [num_problems, n], got shape {correct.shape}")
    n = correct.shape[1]
    counts = correct.astype(bool).sum(axis=1)
    out = {}
    for k in ks:
        if k > n:
            raise ValueError(f"k={k} exceeds the number of samples per problem n={n}")
        out[int(k)] = float(np.mean([pass_at_k(n, int(c), int(k)) for c in counts])) if len(counts) else math.nan
    return out


def summarize(values: Mapping[str, object]) -> dict[str, float]:
    """Convert a dict of scalars/0-d arrays into plain floats (for JSON and loggers)."""
    out = {}
    for key, value in values.items():
        arr = np.asarray(value)
        if arr.size != 1:
            raise ValueError(f"metric {key!r} is not a scalar (shape {arr.shape})")
        out[key] = float(arr.reshape(()))
    return out
