"""Clipped value loss for a PPO critic."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl_llm.losses._checks import check_2d
from jaxrl_llm.losses.aggregate import aggregate

__all__ = ["value_loss"]


def value_loss(values, old_values, returns, mask, *, clip: float | None = 0.5, agg: str = "token-mean",
               normalizer=None, agg_constant=None):
    """``L = 0.5 * max((V - R)^2, (clip(V, V_old - clip, V_old + clip) - R)^2)`` aggregated with ``agg``.

    ``clip=None`` gives the plain squared error. Returns ``(loss, metrics)``.
    """
    check_2d(values=values, old_values=old_values, returns=returns, mask=mask)
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    mask = mask.astype(bool)
    v = values.astype(jnp.float32)
    old = jax.lax.stop_gradient(old_values.astype(jnp.float32))
    ret = jax.lax.stop_gradient(returns.astype(jnp.float32))
    err = jnp.square(v - ret)
    if clip is None:
        per_token = 0.5 * err
        clipped_active = jnp.zeros_like(mask)
    else:
        v_clip = old + jnp.clip(v - old, -clip, clip)
        err_clip = jnp.square(v_clip - ret)
        per_token = 0.5 * jnp.maximum(err, err_clip)
        clipped_active = err_clip > err
    m = mask.astype(jnp.float32)
    denom = jnp.maximum(m.sum(), 1.0)
    metrics = {
        "value_clip_frac": jnp.sum(jnp.where(mask, clipped_active, False)) / denom,
        "value_mean": jnp.sum(jnp.where(mask, v, 0.0)) / denom,
        "value_error": jnp.sum(jnp.where(mask, err, 0.0)) / denom,
    }
    return aggregate(per_token, mask, agg, normalizer=normalizer, constant=agg_constant), metrics
