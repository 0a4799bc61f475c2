"""Log-probabilities and entropies of tokens, including a chunked kernel over the unembedding.

``token_logprobs_and_entropy`` never materialises ``[batch, time, vocab]`` logits: it walks over chunks of the
time axis, computing ``[batch, chunk, vocab]`` logits at a time, in the forward *and* in the backward pass (a
custom VJP recomputes each chunk's logits instead of storing them). Peak memory is that of one chunk of logits
instead of the full tensor (for a 151,936-entry vocabulary and 8,192 tokens the full tensor is 5 GB in fp32).
On a device mesh the rows are walked in blocks, one per group of devices that holds them, and the unembedding's
gradient is summed per block until the end, so no device computes or holds another block's logits.
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


def _unplaced(x):
    return x


def _chunk_stats(h, w, tok, inv_t, place=_unplaced):
    """Per-token (logp, entropy, logsumexp, mean logit) for one chunk: h [..., c, D], w [D, V], tok [..., c]."""
    z = place(jnp.einsum("...d,dv->...v", h, w, preferred_element_type=jnp.float32) * inv_t)
    top = jnp.max(z, axis=-1)
    zs = z - top[..., None]  # shifted logits keep lse - E[z] free of cancellation
    lse_s = jnp.log(jnp.sum(jnp.exp(zs), axis=-1))
    p = jnp.exp(zs - lse_s[..., None])
    ez_s = jnp.sum(p * zs, axis=-1)
    z_tok = jnp.take_along_axis(zs, tok[..., None], axis=-1)[..., 0]
    return z_tok - lse_s, lse_s - ez_s, lse_s + top, ez_s + top


def _to_chunks(x, chunk, n, blocks):
    """[B, T, ...] -> [n, blocks, B / blocks, chunk, ...], or [n, B, chunk, ...] for one block (T = n * chunk).

    One block keeps the plain layout so that a single device runs the same contractions as without blocks."""
    b = x.shape[0]
    if blocks == 1:
        return jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)
    x = x.reshape((blocks, b // blocks, n, chunk) + x.shape[2:])
    return jnp.moveaxis(x, 2, 0)


def _from_chunks(x, blocks):
    """The inverse of ``_to_chunks``: -> [B, n * chunk, ...]."""
    if blocks == 1:
        x = jnp.moveaxis(x, 0, 1)
        return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])
    x = jnp.moveaxis(x, 0, 2)
    return x.reshape((x.shape[0] * x.shape[1], x.shape[2] * x.shape[3]) + x.shape[4:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _chunked(hidden, unembed, tokens, chunk, inv_t, blocks, place):
    logp, ent, _, _ = _chunked_fwd_impl(hidden, unembed, tokens, chunk, inv_t, blocks, place)
    return logp, ent


def _chunked_fwd_impl(hidden, unembed, tokens, chunk, inv_t, blocks, place):
    n = hidden.shape[1] // chunk

    def body(_, xs):
        h, tok = xs
        return None, tuple(place(o) for o in _chunk_stats(place(h), unembed, tok, inv_t, place))

    xs = (_to_chunks(hidden, chunk, n, blocks), _to_chunks(tokens, chunk, n, blocks))
    _, out = jax.lax.scan(body, None, xs)
    return tuple(_from_chunks(o, blocks) for o in out)


def _chunked_fwd(hidden, unembed, tokens, chunk, inv_t, blocks, place):
    logp, ent, lse, ez = _chunked_fwd_impl(hidden, unembed, tokens, chunk, inv_t, blocks, place)
    return (logp, ent), (hidden, unembed, tokens, lse, ez)


def _chunked_bwd(chunk, inv_t, blocks, place, res, cts):
    hidden, unembed, tokens, lse, ez = res
    g_logp, g_ent = cts
    n = hidden.shape[1] // chunk
    w_spec = "bcd,bcv->dv" if blocks == 1 else "sbcd,sbcv->sdv"
    vocab = unembed.shape[1]

    def body(g_w, xs):
        h, tok, lse_c, ez_c, gl, ge = xs
        h = place(h)
        z = place(jnp.einsum("...d,dv->...v", h, unembed, preferred_element_type=jnp.float32) * inv_t)
        p = jnp.exp(z - lse_c[..., None])
        onehot = jax.nn.one_hot(tok, vocab, dtype=jnp.float32)
        # d logp / dz = onehot - p ;  d H / dz = -p (z - E_p[z])
        g_z = gl[..., None] * (onehot - p) - ge[..., None] * p * (z - ez_c[..., None])
        g_z = place(g_z * inv_t)
        g_h = place(jnp.einsum("...v,dv->...d", g_z, unembed.astype(jnp.float32)).astype(h.dtype))
        # one partial sum per row block, each on the devices of its rows: reduced once after the loop, not per chunk
        g_w = place(g_w + jnp.einsum(w_spec, h.astype(jnp.float32), g_z))
        return g_w, g_h

    xs = tuple(_to_chunks(x, chunk, n, blocks) for x in (hidden, tokens, lse, ez, g_logp, g_ent))
    if blocks == 1:
        g_w, g_h = jax.lax.scan(body, jnp.zeros(unembed.shape, jnp.float32), xs)
        return _from_chunks(g_h, 1), g_w.astype(unembed.dtype), None
    g_w, g_h = jax.lax.scan(body, place(jnp.zeros((blocks,) + unembed.shape, jnp.float32)), xs)
    return _from_chunks(g_h, blocks), g_w.sum(axis=0).astype(unembed.dtype), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def token_logprobs_and_entropy(hidden: jax.Array, unembed: jax.Array, tokens: jax.Array, *, chunk: int = 512,
                               temperature: float = 1.0, row_blocks: int = 1,
                               place_rows=None) -> tuple[jax.Array, jax.Array]:
    """Per-token ``log softmax(hidden @ unembed / temperature)[tokens]`` and entropies, chunked over time.

    Args:
      hidden: ``[B, T, D]`` final hidden states (after the final norm).
      unembed: ``[D, V]`` unembedding matrix (``logits = hidden @ unembed``).
      tokens: ``[B, T]`` int token ids whose log-probs are wanted.
      chunk: time steps per chunk; need not divide ``T`` (the tail is padded).
      temperature: divides the logits before the softmax (use the sampling temperature).
      row_blocks: split the rows into this many blocks (the ways a device mesh splits them; 1 when it does not
        divide the batch) ...
      place_rows: ... and keep every per-block array on its block's devices with this function of an array whose
        leading axis is the block axis (e.g. a sharding constraint). Without it the partitioner may meet rows split
        over the same mesh axis as the unembedding's hidden dimension by gathering the rows: every device would
        then compute the logits of the whole batch.

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
    blocks = row_blocks if row_blocks > 1 and b % row_blocks == 0 else 1
    place = place_rows if blocks > 1 and place_rows is not None else _unplaced
    logp, ent = _chunked(hidden, unembed, tokens, chunk, 1.0 / float(temperature), blocks, place)
    return logp[:, :t], ent[:, :t]
