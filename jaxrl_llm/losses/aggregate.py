"""Reduction of per-token loss terms to a scalar, with the conventions used by RL-for-LLM trainers.

Every mode is ``numerator / normalizer``:

==========================  ==========================================  ============================
mode                         numerator                                   default normalizer
==========================  ==========================================  ============================
``token-mean``               sum over valid tokens                        number of valid tokens
``token-sum``                sum over valid tokens                        1
``seq-mean-token-mean``      sum over sequences of the per-sequence mean  number of non-empty sequences
``seq-mean-token-sum``       sum over sequences of the per-sequence sum   number of non-empty sequences
``seq-mean-token-sum-norm``  sum of per-sequence sums / ``constant``      number of non-empty sequences
==========================  ==========================================  ============================

``token-mean`` is DAPO's token-level loss, ``seq-mean-token-mean`` the original GRPO/GSPO loss,
``seq-mean-token-sum-norm`` Dr. GRPO's constant normaliser (``constant`` defaults to the padded response length
``T``; Dr. GRPO uses the generation budget).

Passing ``normalizer`` (from :func:`global_normalizer` over the *whole* batch) makes the reduction additive:
the values of micro-batches, or of data-parallel shards, sum to the value of the whole batch, and so do their
gradients.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl_llm.losses._checks import check_2d, check_choice

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

__all__ = ["AGG_MODES", "aggregate", "global_normalizer"]


def _numerator(x: jax.Array, mask: jax.Array, mode: str, constant: float | None) -> jax.Array:
    m = mask.astype(jnp.float32)
    xm = jnp.where(mask, x.astype(jnp.float32), 0.0)
    if mode in ("token-mean", "token-sum"):
        return xm.sum()
    seq_sum = xm.sum(axis=-1)
    if mode == "seq-mean-token-mean":
        return (seq_sum / jnp.maximum(m.sum(axis=-1), 1.0)).sum()
    if mode == "seq-mean-token-sum":
        return seq_sum.sum()
    const = float(mask.shape[-1]) if constant is None else float(constant)
    return seq_sum.sum() / const


def global_normalizer(mask: jax.Array, mode: str, *, constant: float | None = None) -> jax.Array:
    """The normaliser of ``mode`` for the batch described by ``mask [batch, time]``.

    Compute it once over the whole (global) batch and pass it to :func:`aggregate` for every micro-batch.
    ``constant`` is accepted for symmetry with :func:`aggregate` and does not change the normaliser.
    """
    check_choice("mode", mode, AGG_MODES)
    check_2d(mask=mask)
    del constant
    m = mask.astype(jnp.float32)
    if mode == "token-mean":
        return m.sum()
    if mode == "token-sum":
        return jnp.asarray(1.0, jnp.float32)
    return (m.sum(axis=-1) > 0).astype(jnp.float32).sum()


def aggregate(x: jax.Array, mask: jax.Array, mode: str = "token-mean", *, normalizer: jax.Array | float | None = None,
              constant: float | None = None) -> jax.Array:
    """Reduce per-token values ``x [batch, time]`` over the valid tokens of ``mask`` to a scalar (see module doc).

    An empty selection (normaliser 0) reduces to 0 rather than NaN.
    """
    check_choice("mode", mode, AGG_MODES)
    check_2d(x=x, mask=mask)
    if constant is not None and not constant > 0:
        raise ValueError(f"constant must be > 0, got {constant}")
    num = _numerator(x, mask, mode, constant)
    den = global_normalizer(mask, mode) if normalizer is None else jnp.asarray(normalizer, jnp.float32)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
