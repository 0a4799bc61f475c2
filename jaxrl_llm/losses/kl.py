"""Per-token KL estimators between the current policy and a reference (Schulman's k1, k2, k3).

With ``x = ref_logp - logp`` (log of ``pi_ref / pi``) on tokens sampled from ``pi``:

* ``k1 = -x = logp - ref_logp``             unbiased, high variance, can be negative
* ``k2 = x^2 / 2``                           biased, low variance; its gradient is the true KL gradient
* ``k3 = exp(x) - x - 1``                    unbiased, low variance, never negative
* ``k3+``: the value of k3 with the gradient of k2 (straight-through), as used by several trainers to get an
  unbiased gradient estimate while reporting k3.

Each estimator's value is clamped to ``[-clamp, clamp]`` (default 10, as common trainers do) so one
pathological token cannot dominate; ``clamp=None`` disables it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl_llm.losses._checks import check_2d, check_choice

KL_ESTIMATORS = ("k1", "k2", "k3", "k3+")

__all__ = ["KL_ESTIMATORS", "kl"]


def kl(logp: jax.Array, ref_logp: jax.Array, estimator: str = "k3", *, clamp: float | None = 10.0) -> jax.Array:
    """Per-token KL(pi || pi_ref) estimate ``[batch, time]``; usable as a loss term or a reward penalty."""
    check_choice("estimator", estimator, KL_ESTIMATORS)
    check_2d(logp=logp, ref_logp=ref_logp)
    if clamp is not None and not clamp > 0:
        raise ValueError(f"clamp must be > 0 or None, got {clamp}")
    x = ref_logp.astype(jnp.float32) - logp.astype(jnp.float32)
    k2 = 0.5 * jnp.square(x)
    if estimator == "k1":
        value = -x
    elif estimator == "k2":
        value = k2
    else:
        k3 = jnp.expm1(x) - x
        value = k3 if estimator == "k3" else k2 + jax.lax.stop_gradient(k3 - k2)
    if clamp is not None:
        value = jnp.clip(value, -clamp, clamp)
    return value
