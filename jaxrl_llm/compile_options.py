"""XLA compile options shared by the sampler's and the trainer's programs.

On CPU, XLA hands matrix products and reductions to YNNPACK by default. For the decode loop's many small
``[rows, hidden]``-sized products XLA's own kernels are faster (the sampler benchmark's rollout: 0.50 s against
0.57-0.71 s), while the trainer's large products run a little slower without YNNPACK (0.86 s against 0.83 s per
update). Sampler and trainer still compile alike: products computed by different kernels round differently, and
the log-probs of the two sides would drift apart (measured on a trained policy: mean |diff| 2.4e-7 with the sampler
alone changed, 1.2e-7 with both, 0.8e-7 with neither).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["compiler_options"]

_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def compiler_options() -> dict | None:
    """Options for ``jax.jit(..., compiler_options=...)``: none off CPU, or with an XLA that lacks the option."""
    if jax.default_backend() != "cpu":
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=_CPU_OPTIONS).lower(jnp.zeros((), jnp.float32)).compile()
    except Exception:  # noqa: BLE001 - an XLA without the option rejects it: keep its defaults
        return None
    return dict(_CPU_OPTIONS)
