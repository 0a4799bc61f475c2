"""Sampling parameters and the logit filters (temperature, top-k, top-p, min-p, greedy)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["SamplingParams", "filter_logits", "gumbel_noise", "sample_tokens"]

_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. Hashable: it is a static argument of the jitted sampler.

    ``temperature`` divides the logits; ``top_k`` (0 = off) keeps the k most likely tokens; ``top_p`` (1 = off)
    keeps the smallest set whose probability reaches p; ``min_p`` (0 = off) keeps tokens with probability at least
    ``min_p`` times the most likely one's; ``greedy`` takes the argmax. ``n`` samples are drawn per prompt.
    ``stop_tokens`` end a row (the stop token is kept as the last response token).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    greedy: bool = False
    max_new_tokens: int = 64
    n: int = 1
    stop_tokens: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))
        if any(t < 0 for t in self.stop_tokens):
            raise ValueError(f"stop_tokens must be token ids >= 0, got {self.stop_tokens}")


def filter_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Temperature-scaled logits ``[N, V]`` (fp32) with the tokens excluded by top-k/top-p/min-p set to -inf."""
    z = logits.astype(jnp.float32) / params.temperature
    vocab = z.shape[-1]
    if params.top_k and params.top_k < vocab:
        kth = jax.lax.top_k(z, params.top_k)[0][..., -1:]
        z = jnp.where(z >= kth, z, _NEG_INF)
    if params.top_p < 1.0:
        order = jnp.argsort(-z, axis=-1)
        sorted_z = jnp.take_along_axis(z, order, axis=-1)
        probs = jax.nn.softmax(sorted_z, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep_sorted = before < params.top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(z.shape[0])[:, None], order].set(keep_sorted)
        z = jnp.where(keep, z, _NEG_INF)
    if params.min_p > 0.0:
        p = jax.nn.softmax(z, axis=-1)
        z = jnp.where(p >= params.min_p * jnp.max(p, axis=-1, keepdims=True), z, _NEG_INF)
    return z


def sample_tokens(key: jax.Array, logits: jax.Array, params: SamplingParams, gumbel: jax.Array | None = None
                  ) -> jax.Array:
    """Draw one token per row of ``logits [N, V]`` (Gumbel-max: ``argmax(filtered logits + Gumbel noise)``).

    ``gumbel`` (``[N, V]`` standard Gumbel noise, e.g. drawn ahead of time by :func:`gumbel_noise`) replaces the
    noise drawn from ``key``.
    """
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if gumbel is None:
        gumbel = gumbel_noise(key, logits.shape)
    return jnp.argmax(filter_logits(logits, params) + gumbel, axis=-1).astype(jnp.int32)


def gumbel_noise(key: jax.Array, shape) -> jax.Array:
    return jax.random.gumbel(key, shape, jnp.float32)
