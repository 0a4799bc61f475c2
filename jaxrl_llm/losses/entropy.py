"""Log-probabilities and entropies of tokens, including a chunked kernel over the unembedding.

``token_logprobs_and_entropy`` never materialises ``[batch, time, vocab]`` logits: it walks over chunks of the
time axis, computing ``[batch, chunk, vocab]`` logits at a time, in the forward *and* in the backward pass (a
custom VJP recomputes each chunk's logits instead of storing them). Peak memory is that of one chunk of logits
instead of the full tensor (for a 151,936-entry vocabulary and 8,192 tokens the full tensor is 5 GB in fp32).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["entropy_from_logits", "logprobs_from_logits", "token_logprobs_and_entropy"]


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """Entropy of ``softmax(logits)`` over the last axis: ``logsumexp(z) - sum_j p_j z_j`` (stable, fp32)."""
    z = logits.astype(jnp.float32)
    # shift by the max so lse and E_p[z] stay O(log V) and their difference does not cancel badly
    z = z - jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
    p = jnp.exp(z - lse)
    # where z = -inf (masked entries) p = 0; avoid 0 * inf
    zp = jnp.where(p > 0, p * z, 0.0)
    return lse[..., 0] - zp.sum(axis=-1)


def logprobs_from_logits(logits: jax.Array, tokens: jax.Array, temperature: float = 1.0) -> jax.Array:
    """``log softmax(logits / temperature)[tokens]`` in fp32 (for small vocabularies and tests)."""
    _check_temperature(temperature)
    z = logits.astype(jnp.float32) / temperature
    logp = jax.nn.log_softmax(z, axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _check_temperature(temperature) -> None:
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")


def _chunk_stats(h, w, tok, inv_t):
    """Per-token (logp, entropy, logsumexp, mean logit) for one chunk: h [B, c, D], w [D, V], tok [B, c]."""
    z = jnp.einsum("bcd,dv->bcv", h, w, preferred_element_type=jnp.float32) * inv_t
    top = jnp.max(z, axis=-1)
    zs = z - top[..., None]  # shifted logits keep lse - E[z] free of cancellation
    lse_s = jnp.log(jnp.sum(jnp.exp(zs), axis=-1))
    p = jnp.exp(zs - lse_s[..., None])
    ez_s = jnp.sum(p * zs, axis=-1)
    z_tok = jnp.take_along_axis(zs, tok[..., None], axis=-1)[..., 0]
    return z_tok - lse_s, lse_s - ez_s, lse_s + top, ez_s + top


def _to_chunks(x, chunk, n):
    """[B, T, ...] -> [n, B, chunk, ...] (T already padded to n * chunk)."""
    b = x.shape[0]
    x = x.reshape((b, n, chunk) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _from_chunks(x):
    """[n, B, chunk, ...] -> [B, n * chunk, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked(hidden, unembed, tokens, chunk, inv_t):
    logp, ent, _, _ = _chunked_fwd_impl(hidden, unembed, tokens, chunk, inv_t)
    return logp, ent


def _chunked_fwd_impl(hidden, unembed, tokens, chunk, inv_t):
    n = hidden.shape[1] // chunk

    def body(_, xs):
        h, tok = xs
        return None, _chunk_stats(h, unembed, tok, inv_t)

    _, out = jax.lax.scan(body, None, (_to_chunks(hidden, chunk, n), _to_chunks(tokens, chunk, n)))
    return tuple(_from_chunks(o) for o in out)


def _chunked_fwd(hidden, unembed, tokens, chunk, inv_t):
    logp, ent, lse, ez = _chunked_fwd_impl(hidden, unembed, tokens, chunk, inv_t)
    return (logp, ent), (hidden, unembed, tokens, lse, ez)


def _chunked_bwd(chunk, inv_t, res, cts):
    hidden, unembed, tokens, lse, ez = res
    g_logp, g_ent = cts
    n = hidden.shape[1] // chunk
    vocab = unembed.shape[1]

    def body(g_w, xs):
        h, tok, lse_c, ez_c, gl, ge = xs
        z = jnp.einsum("bcd,dv->bcv", h, unembed, preferred_element_type=jnp.float32) * inv_t
        p = jnp.exp(z - lse_c[..., None])
        onehot = jax.nn.one_hot(tok, vocab, dtype=jnp.float32)
        # d logp / dz = onehot - p ;  d H / dz = -p (z - E_p[z])
        g_z = gl[..., None] * (onehot - p) - ge[..., None] * p * (z - ez_c[..., None])
        g_z = g_z * inv_t
        g_h = jnp.einsum("bcv,dv->bcd", g_z, unembed.astype(jnp.float32)).astype(h.dtype)
        g_w = g_w + jnp.einsum("bcd,bcv->dv", h.astype(jnp.float32), g_z)
        return g_w, g_h

    xs = tuple(_to_chunks(x, chunk, n) for x in (hidden, tokens, lse, ez, g_logp, g_ent))
    g_w, g_h = jax.lax.scan(body, jnp.zeros(unembed.shape, jnp.float32), xs)
    return _from_chunks(g_h), g_w.astype(unembed.dtype), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def token_logprobs_and_entropy(hidden: jax.Array, unembed: jax.Array, tokens: jax.Array, *, chunk: int = 512,
                               temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Per-token ``log softmax(hidden @ unembed / temperature)[tokens]`` and entropies, chunked over time.

    Args:
      hidden: ``[B, T, D]`` final hidden states (after the final norm).
      unembed: ``[D, V]`` unembedding matrix (``logits = hidden @ unembed``).
      tokens: ``[B, T]`` int token ids whose log-probs are wanted.
      chunk: time steps per chunk; need not divide ``T`` (the tail is padded).
      temperature: divides the logits before the softmax (use the sampling temperature).

    Returns ``(logp [B, T], entropy [B, T])`` in float32. Logits are computed in float32 whatever the input dtype.
    Differentiable in ``hidden`` and ``unembed``; the backward pass also works chunk by chunk.
    """
    _check_temperature(temperature)
    if hidden.ndim != 3:
        raise ValueError(f"hidden must be [batch, time, hidden], got shape {hidden.shape}")
    if unembed.ndim != 2 or unembed.shape[0] != hidden.shape[2]:
        raise ValueError(f"unembed must be [hidden={hidden.shape[2]}, vocab], got shape {unembed.shape}")
    if tokens.shape != hidden.shape[:2]:
        raise ValueError(f"tokens must have shape {hidden.shape[:2]} (batch, time of hidden), got {tokens.shape}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    b, t, _ = hidden.shape
    chunk = min(chunk, t) if t > 0 else 1
    pad = (-t) % chunk
    tokens = tokens.astype(jnp.int32)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        tokens = jnp.pad(tokens, ((0, 0), (0, pad)))
    logp, ent = _chunked(hidden, unembed, tokens, chunk, 1.0 / float(temperature))
    return logp[:, :t], ent[:, :t]
