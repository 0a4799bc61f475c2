"""Sampler-trainer mismatch metrics: statistics of the log-prob gap over a rollout's tokens."""
from __future__ import annotations

import jax.numpy as jnp

__all__ = ["mismatch_metrics"]


def mismatch_metrics(sampler_logp, trainer_logp, mask, *, threshold: float = 1e-3, prefix: str = "mismatch") -> dict:
    """Statistics of ``trainer_logp - sampler_logp`` over valid tokens.

    * ``mismatch_abs_mean`` / ``mismatch_abs_max``: mean and max ``|log pi - log mu|``;
    * ``mismatch_kl``: k3 estimate of ``KL(mu || pi)`` from tokens sampled by ``mu``
      (``E[r - 1 - log r]`` with ``r = pi / mu``);
    * ``mismatch_chi2``: ``E_mu[r^2] - 1``, i.e. chi-square(pi || mu), which governs importance-weight variance;
    * ``mismatch_frac_above``: fraction of tokens with ``|log pi - log mu| > threshold``.

    ``prefix`` replaces ``mismatch`` in the names (the trainer reports ``train_sampler_*`` from the update and
    ``score_sampler_*`` from a scoring pass).
    """
    m = mask.astype(bool)
    count = jnp.maximum(m.sum(), 1)
    d = jnp.where(m, trainer_logp.astype(jnp.float32) - sampler_logp.astype(jnp.float32), 0.0)
    ad = jnp.abs(d)
    r = jnp.exp(d)
    return {
        f"{prefix}_abs_mean": ad.sum() / count,
        f"{prefix}_abs_max": ad.max(),
        f"{prefix}_kl": jnp.where(m, r - 1.0 - d, 0.0).sum() / count,
        f"{prefix}_chi2": jnp.where(m, r * r - 1.0, 0.0).sum() / count,
        f"{prefix}_frac_above": (m & (ad > threshold)).sum() / count,
    }
