"""Causal attention behind one switch (``model.attention``), with the mask described instead of materialised.

Every kernel computes, per query ``i`` and head ``h`` (``h`` reads key/value head ``h // g``, GQA),

    out_i = sum_j softmax_j(s_ij) v_j,    s_ij = q_i . k_j / sqrt(d)   over the keys j that ``i`` may see,

and which keys a query sees is an :class:`AttentionMask`: keys are the slots ``0 .. S-1`` (of the KV cache, or of
the sequence itself without a cache), query ``i`` sits at slot ``q_offset + i``, and

    allowed(i, j) = [j <= q_offset + i] and k_valid[j] and (k_segment[j] == 0 or k_segment[j] == q_segment[i]).

Left padding is ``k_valid``; packed responses are segments 1, 2, ...; segment 0 marks the cached shared prompt
that every segment sees. Each kernel turns this into masks block by block, so no ``[B, T, S]`` array exists
(``dense`` builds the full mask; it is the reference). A query that may see no key at all (a padded one) gets an
unspecified finite output, which kernels need not agree on and the model never uses.

Kernels (``KERNELS``):
  * ``dense``: scores ``[B, kv, g, T, S]`` in float32, softmax, values. Memory quadratic in the length.
  * ``blockwise``: flash attention in pure JAX. Queries in blocks of ``QUERY_BLOCK``, keys in blocks of
    ``KEY_BLOCK``; per query block a loop over key blocks 0, 1, ... keeps the running maximum ``m``, the sum
    ``l = sum_j exp(s_ij - m)`` and ``acc = sum_j exp(s_ij - m) v_j``, rescaled by ``exp(m_old - m_new)`` when
    the maximum grows; ``out = acc / l`` and ``lse = m + log l``. Key blocks after the query block's last slot
    (causality) are not visited, so the loop has a dynamic trip count. The backward pass (``jax.custom_vjp``)
    keeps only ``out`` and ``lse`` and recomputes each block's probabilities ``p_ij = exp(s_ij - lse_i)``:
    ``dv_j = sum_i p_ij do_i``, ``ds_ij = p_ij (do_i . v_j - D_i)`` with ``D_i = do_i . out_i``,
    ``dq_i = sum_j ds_ij k_j / sqrt(d)``, ``dk_j = sum_i ds_ij q_i / sqrt(d)``. Memory is linear in the length
    forward and backward.
  * ``cudnn`` and ``splash``: the GPU and TPU kernels (:mod:`jaxrl_llm.models.fused_attention`).
  * ``auto``: :func:`resolve` picks per backend.

Decoding (one query per row against the KV cache) always runs :func:`decode_attention` except under ``dense``:
the same online softmax over the cache's key blocks, only up to the block holding the newest slot.

Block layout shared by every caller. ``KEY_BLOCK`` is one constant for prefill, the training forward and the
decode step: over a key range of ``S`` slots (the KV cache's, or the sequence's own), key block ``b`` is the slots
``[b * KEY_BLOCK, min((b + 1) * KEY_BLOCK, S))`` (the last block is cut, never padded), and blocks are visited in
ascending order. Where the trainer's key range has the sampler's ``S`` (prompt width + response width), a query
position meets the same key blocks, in the same order, with the same extent, whether it is decoded or trained on:
the condition for making the two agree bit for bit. (The cache is not
padded to whole blocks: a decode step over a short cache reads no more slots than it holds.)
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import flax
import jax
import jax.numpy as jnp

from jaxrl_llm.models.remat import after

KERNELS = ("auto", "dense", "blockwise", "cudnn", "splash")
KEY_BLOCK = 128  # one row of TPU lanes; the same for every caller (module docstring)
QUERY_BLOCK = 512
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

__all__ = ["AttentionMask", "KERNELS", "KEY_BLOCK", "QUERY_BLOCK", "attend", "blockwise_attention",
           "check_kernel", "decode_attention", "dense_attention", "resolve", "static_decode_blocks"]


@flax.struct.dataclass
class AttentionMask:
    """Which key slots each query may see (module docstring), for queries ``[B, T]`` and key slots ``[B, S]``."""

    q_offset: jax.Array  # int32 scalar: the slot of query 0
    k_valid: jax.Array  # bool [B, S]: the slot holds a real token
    q_segment: jax.Array | None = None  # int32 [B, T]
    k_segment: jax.Array | None = None  # int32 [B, S]; 0 = seen by every segment
    causal: bool = flax.struct.field(pytree_node=False, default=True)

    def block(self, q_start, q_len: int, k_start, k_len: int) -> jax.Array:
        """``allowed`` for queries ``q_start .. q_start + q_len`` and key slots ``k_start .. k_start + k_len``:
        bool ``[B, q_len, k_len]``. The starts may be traced; the ranges must lie inside the arrays."""
        ok = jax.lax.dynamic_slice_in_dim(self.k_valid, k_start, k_len, axis=1)[:, None, :]
        if self.causal:
            q_slot = self.q_offset + q_start + jnp.arange(q_len)
            k_slot = k_start + jnp.arange(k_len)
            ok = ok & (k_slot[None, None, :] <= q_slot[None, :, None])
        if self.q_segment is not None:
            ks = jax.lax.dynamic_slice_in_dim(self.k_segment, k_start, k_len, axis=1)[:, None, :]
            qs = jax.lax.dynamic_slice_in_dim(self.q_segment, q_start, q_len, axis=1)[:, :, None]
            ok = ok & ((ks == 0) | (ks == qs))
        return ok

    def padded(self, t: int) -> "AttentionMask":
        """The same mask for ``t`` queries (the added ones in segment 0)."""
        if self.q_segment is None:
            return self
        return self.replace(q_segment=jnp.pad(self.q_segment, ((0, 0), (0, t - self.q_segment.shape[1]))))


# ---------------------------------------------------------------------------------------------------------------
# choosing a kernel


def available(backend: str | None = None) -> tuple[str, ...]:
    """The kernels that run on ``backend`` (the default backend when None)."""
    backend = backend or jax.default_backend()
    extra = {"gpu": ("cudnn",), "cuda": ("cudnn",), "tpu": ("splash",)}.get(backend, ())
    return ("auto", "dense", "blockwise") + extra


def check_kernel(kind: str, *, dtype=jnp.float32, head_dim: int = 128) -> None:
    """Raise at start when ``model.attention`` names no kernel, one this backend does not have, or cuDNN with a
    precision or head size it does not take."""
    if kind not in KERNELS:
        raise ValueError(f"model.attention must be one of {KERNELS}, got {kind!r}")
    have = available()
    if kind not in have:
        raise ValueError(f"model.attention={kind!r} does not run on the {jax.default_backend()} backend; "
                         f"available here: {', '.join(have)}")
    if kind == "cudnn" and not _cudnn_fits(dtype, head_dim):
        raise ValueError(f"model.attention='cudnn' needs model.dtype bfloat16 (or float16) and a head dimension "
                         f"that is a multiple of 8 up to 128; got {jnp.dtype(dtype).name} and {head_dim}")


def _cudnn_fits(dtype, head_dim: int) -> bool:
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return half and head_dim % 8 == 0 and head_dim <= 128


# Up to this many key slots ``auto`` on CPU takes ``dense``, beyond them ``blockwise``. Forward + backward of a small
# decoder (benchmarks/long_context.py, docs/benchmarks.md): below ~200 keys blockwise's loops cost up to a quarter
# more time, from ~200 to ~400 the two take the same time, and beyond, dense's quadratic arrays make it the slower
# one (2x at 1k tokens, 4x at 2k) besides needing quadratic memory.
CPU_DENSE_MAX_KEYS = 256


def resolve(kind: str, *, keys: int, head_dim: int, dtype, cached: bool, segments: bool) -> str:
    """The kernel ``kind`` stands for, for one attention call (``auto`` decides here).

    TPU: splash. GPU: cuDNN where its public interface expresses the mask without a ``[B, T, S]`` array
    (no cache, no segments; half precision and a head dimension it supports), otherwise blockwise. CPU: dense up
    to ``CPU_DENSE_MAX_KEYS`` key slots, blockwise beyond."""
    if kind != "auto":
        return kind
    backend = jax.default_backend()
    if backend == "tpu":
        return "splash"
    if backend in ("gpu", "cuda"):
        return "cudnn" if _cudnn_fits(dtype, head_dim) and not cached and not segments else "blockwise"
    return "dense" if keys <= CPU_DENSE_MAX_KEYS else "blockwise"


# ---------------------------------------------------------------------------------------------------------------
# dense (the reference)


def _softmax_values(scores, allowed, v, dt, pattern):
    scores = jnp.where(allowed[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    return jnp.einsum(pattern, probs, v)


def dense_attention(q, k, v, mask: AttentionMask, *, cached: bool, dt):
    """Scores for every (query, key slot) pair, in float32.

    ``q [B, T, kv, g, d]``; without a cache ``k, v [B, S, kv, d]``, with one the cache's ``k [B, kv, d, S]`` and
    ``v [B, kv, S, d]``. Returns ``[B, T, kv, g, d]``."""
    t = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1])
    allowed = mask.block(0, t, 0, k.shape[1 if not cached else 3])
    if not cached:
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
        return _softmax_values(scores, allowed, v, dt, "bkgts,bskd->btkgd")
    k, v = k.astype(dt), v.astype(dt)
    if t == 1:
        # one query per row (decoding): multiply-reduce instead of many tiny batched matrix products
        scores = jnp.sum(q[:, 0, :, :, :, None].astype(jnp.float32) * k[:, :, None].astype(jnp.float32),
                         axis=3)[:, :, :, None, :] * scale
        scores = jnp.where(allowed[:, None, None, :, :], scores, MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        return jnp.sum(probs[:, :, :, 0, :, None] * v[:, :, None], axis=3)[:, None]
    # in float32: XLA:CPU has no bf16 x bf16 -> f32 product for this key layout
    scores = jnp.einsum("btkgd,bkds->bkgts", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    return _softmax_values(scores, allowed, v, dt, "bkgts,bksd->btkgd")


# ---------------------------------------------------------------------------------------------------------------
# decoding: the filled key blocks of the cache only


def _online_update(carry, scores, allowed, values_of):
    """One key block of the online softmax: ``carry = (m, l, acc)``; ``values_of(p)`` gives ``sum_j p_j v_j``."""
    m, l, acc = carry
    scores = jnp.where(allowed, scores, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
    p = jnp.exp(scores - m_new[..., None])
    alpha = jnp.exp(m - m_new)
    return m_new, alpha * l + jnp.sum(p, axis=-1), alpha[..., None] * acc + values_of(p)


# Decode steps traced under static_decode_blocks() visit the cache's key blocks in a loop of static length (every
# full block, the unfilled ones skipped by a conditional) instead of one that stops at the newest slot: the
# dynamic loop cannot be differentiated in reverse mode. Exact consistency's sampler and its update's decode pass
# run this loop, so the decode loop whose values exact mode uses can be differentiated (the tests compare its
# gradient with the one exact mode takes), and both compile the same arithmetic.
_STATIC_DECODE_BLOCKS = contextvars.ContextVar("static_decode_blocks", default=False)


@contextlib.contextmanager
def static_decode_blocks(on: bool = True):
    """Decode steps traced inside visit the cache's key blocks in a loop of static length (reverse-mode
    differentiable; the same blocks, in the same order, with the same arithmetic)."""
    token = _STATIC_DECODE_BLOCKS.set(on)
    try:
        yield
    finally:
        _STATIC_DECODE_BLOCKS.reset(token)


def _visit_key_blocks(slots: int, seen_end, block, carry, *, static: bool = False):
    """``carry = block(start, size, carry)`` for the key blocks that start before slot ``seen_end`` (may be traced),
    in ascending order: blocks of ``KEY_BLOCK`` slots from slot 0, the last one cut at ``slots``. The full blocks
    run in a loop with a dynamic trip count (none when there is only one; ``static``: a loop over every full block
    that skips the unseen ones), the cut block under a conditional."""
    full, cut = divmod(slots, KEY_BLOCK)
    if full == 1:  # every query sees slot 0
        carry = block(0, KEY_BLOCK, carry)
    elif full and static:
        def visit(j, c):
            start = j * KEY_BLOCK
            return jax.lax.cond(seen_end > start, lambda c: block(start, KEY_BLOCK, c), lambda c: c, c)
        carry = jax.lax.fori_loop(0, full, visit, carry)
    elif full:
        count = jnp.clip((seen_end + KEY_BLOCK - 1) // KEY_BLOCK, 0, full)
        carry = jax.lax.fori_loop(0, count, lambda j, c: block(j * KEY_BLOCK, KEY_BLOCK, c), carry)
    if cut and not full:
        carry = block(0, cut, carry)
    elif cut:
        start = full * KEY_BLOCK
        carry = jax.lax.cond(seen_end > start, lambda c: block(start, cut, c), lambda c: c, carry)
    return carry


def _seen_end(mask: AttentionMask, q_end, slots: int):
    """One past the last key slot the queries before ``q_end`` may see."""
    return mask.q_offset + q_end if mask.causal else slots


def decode_attention(q, k_cache, v_cache, mask: AttentionMask, *, dt):
    """One query per row against the cache ``k [B, kv, d, S]``, ``v [B, kv, S, d]``: the key blocks up to the one
    holding slot ``q_offset`` (the newest), in ascending order; the blocks after it are not read.

    ``q [B, 1, kv, g, d]``; returns ``[B, 1, kv, g, d]`` in ``dt``."""
    b, _, kv, g, d = q.shape
    scale = 1.0 / math.sqrt(d)
    q32 = q[:, 0, :, :, :, None].astype(jnp.float32)  # [B, kv, g, d, 1]

    def block(start, size, carry):
        k = jax.lax.dynamic_slice_in_dim(k_cache, start, size, axis=3).astype(dt)
        v = jax.lax.dynamic_slice_in_dim(v_cache, start, size, axis=2).astype(dt)
        # multiply-reduce instead of many tiny batched matrix products
        scores = jnp.sum(q32 * k[:, :, None].astype(jnp.float32), axis=3) * scale  # [B, kv, g, size]
        allowed = mask.block(0, 1, start, size)[:, None]  # [B, 1, 1, size]

        def values_of(p):
            return jnp.sum(p.astype(dt)[..., None] * v[:, :, None], axis=3, dtype=jnp.float32)
        return _online_update(carry, scores, allowed, values_of)

    init = (jnp.full((b, kv, g), -jnp.inf, jnp.float32), jnp.zeros((b, kv, g), jnp.float32),
            jnp.zeros((b, kv, g, d), jnp.float32))
    _, l, acc = _visit_key_blocks(k_cache.shape[3], mask.q_offset + 1, block, init,
                                  static=_STATIC_DECODE_BLOCKS.get())
    return (acc / l[..., None]).astype(dt)[:, None]


# ---------------------------------------------------------------------------------------------------------------
# blockwise (flash attention in JAX)


def _first_query_block(mask: AttentionMask, key_start, bq: int):
    """The first query block whose last slot reaches ``key_start`` (causal), else 0."""
    if not mask.causal:
        return 0
    return jnp.maximum((key_start - mask.q_offset) // bq, 0)


def _scores(qb, kb, scale):
    return jnp.einsum("bkgqd,bkds->bkgqs", qb, kb, preferred_element_type=jnp.float32) * scale


def _key_slices(k_t, v, start, size: int, dt):
    return (jax.lax.dynamic_slice_in_dim(k_t, start, size, axis=3).astype(dt),
            jax.lax.dynamic_slice_in_dim(v, start, size, axis=2).astype(dt))


def _flash_forward(q, k_t, v, mask, bq: int):
    """``q [B, kv, g, Tp, d]`` (whole query blocks), ``k_t [B, kv, d, S]``, ``v [B, kv, S, d]`` -> out, lse."""
    b, kv, g, tp, d = q.shape
    scale = 1.0 / math.sqrt(d)
    slots = k_t.shape[3]
    dt = q.dtype

    def query_block(i, carry):
        out, lse = carry
        qb = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=3)

        def key_block(start, size, carry):
            kb, vb = _key_slices(k_t, v, start, size, dt)
            allowed = mask.block(i * bq, bq, start, size)[:, None, None]

            def values_of(p):
                return jnp.einsum("bkgqs,bksd->bkgqd", p.astype(dt), vb, preferred_element_type=jnp.float32)
            return _online_update(carry, _scores(qb, kb, scale), allowed, values_of)

        init = (jnp.full((b, kv, g, bq), -jnp.inf, jnp.float32), jnp.zeros((b, kv, g, bq), jnp.float32),
                jnp.zeros((b, kv, g, bq, d), jnp.float32))
        m, l, acc = _visit_key_blocks(slots, _seen_end(mask, (i + 1) * bq, slots), key_block, init)
        out = jax.lax.dynamic_update_slice_in_dim(out, (acc / l[..., None]).astype(dt), i * bq, axis=3)
        return out, jax.lax.dynamic_update_slice_in_dim(lse, m + jnp.log(l), i * bq, axis=3)

    # written in place into outputs made from q: a loop's stacked outputs (lax.map) start as a constant, which XLA
    # shares between the layers and copies for each at the start of the program, one output per layer held all along
    init = after(q, (jnp.zeros(q.shape, dt), jnp.zeros(q.shape[:-1], jnp.float32)))
    return jax.lax.fori_loop(0, tp // bq, query_block, init)


def _flash_backward(q, k_t, v, mask, out, lse, dout, bq: int):
    """Gradients of :func:`_flash_forward`, recomputing each block's probabilities from ``lse``: for each key
    block, a loop over the query blocks that see it accumulates its ``dk, dv`` and adds to ``dq``."""
    b, kv, g, tp, d = q.shape
    scale = 1.0 / math.sqrt(d)
    slots = k_t.shape[3]
    dt = q.dtype
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # D_i [B, kv, g, Tp]

    def key_block(start, size, carry):
        dq, dk, dv = carry
        kb, vb = _key_slices(k_t, v, start, size, dt)

        def query_block(i, c):
            dq, dkb, dvb = c
            qs = i * bq
            qb, dob = (jax.lax.dynamic_slice_in_dim(x, qs, bq, axis=3) for x in (q, dout))
            lse_b, delta_b = (jax.lax.dynamic_slice_in_dim(x, qs, bq, axis=3) for x in (lse, delta))
            allowed = mask.block(qs, bq, start, size)[:, None, None]
            scores = jnp.where(allowed, _scores(qb, kb, scale), MASK_VALUE)
            p = jnp.exp(scores - lse_b[..., None])  # [B, kv, g, bq, size]
            dvb = dvb + jnp.einsum("bkgqs,bkgqd->bksd", p.astype(dt), dob, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkgqd,bksd->bkgqs", dob, vb, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta_b[..., None]) * scale).astype(dt)
            dkb = dkb + jnp.einsum("bkgqs,bkgqd->bkds", ds, qb, preferred_element_type=jnp.float32)
            dq_b = jnp.einsum("bkgqs,bkds->bkgqd", ds, kb, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_slice_in_dim(
                dq, jax.lax.dynamic_slice_in_dim(dq, qs, bq, axis=3) + dq_b, qs, axis=3)
            return dq, dkb, dvb

        init = (dq, jnp.zeros((b, kv, d, size), jnp.float32), jnp.zeros((b, kv, size, d), jnp.float32))
        dq, dkb, dvb = jax.lax.fori_loop(_first_query_block(mask, start, bq), tp // bq, query_block, init)
        dk = jax.lax.dynamic_update_slice_in_dim(dk, dkb, start, axis=3)
        dv = jax.lax.dynamic_update_slice_in_dim(dv, dvb, start, axis=2)
        return dq, dk, dv

    # the accumulators are made from the incoming gradient: zeros that depend on nothing may be allocated at the
    # start of the program, and with layers recomputed every layer's would then live through the whole backward
    init = after(delta, tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k_t, v)))
    dq, dk, dv = _visit_key_blocks(slots, _seen_end(mask, tp, slots), key_block, init)
    return dq.astype(q.dtype), dk.astype(k_t.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k_t, v, mask, bq):
    return _flash_forward(q, k_t, v, mask, bq)[0]


def _flash_fwd(q, k_t, v, mask, bq):
    out, lse = _flash_forward(q, k_t, v, mask, bq)
    return out, (q, k_t, v, mask, out, lse)


def _flash_bwd(bq, res, dout):
    q, k_t, v, mask, out, lse = res
    dq, dk, dv = _flash_backward(q, k_t, v, mask, out, lse, dout, bq)
    return dq, dk, dv, jax.tree.map(lambda _: None, mask)


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q, k_t, v, mask: AttentionMask, *, dt):
    """Flash attention over keys ``k_t [B, kv, d, S]``, values ``v [B, kv, S, d]`` (the KV cache's layout) for
    ``q [B, T, kv, g, d]``; returns ``[B, T, kv, g, d]`` in ``dt``."""
    b, t, kv, g, d = q.shape
    bq = min(QUERY_BLOCK, -(-t // 8) * 8)
    tp = -(-t // bq) * bq
    qh = jnp.pad(q.astype(dt).transpose(0, 2, 3, 1, 4), ((0, 0), (0, 0), (0, 0), (0, tp - t), (0, 0)))
    out = _flash(qh, k_t, v, mask.padded(tp), bq)
    return out[:, :, :, :t].transpose(0, 3, 1, 2, 4)


# ---------------------------------------------------------------------------------------------------------------
# the switch


def attend(kind: str, q, k, v, mask: AttentionMask, *, cache=None, dt):
    """Attention of ``q [B, T, kv, g, d]`` with the kernel ``kind`` (see :func:`resolve`).

    ``k, v [B, T, kv, d]``: this call's keys and values. ``cache = (k_all [B, kv, d, S], v_all [B, kv, S, d])``:
    the KV cache with them already written at slots ``q_offset ..``; the keys are then the cache's slots.
    Returns ``[B, T, kv, g, d]`` in ``dt``."""
    t, d = q.shape[1], q.shape[-1]
    keys = t if cache is None else cache[0].shape[3]
    kind = resolve(kind, keys=keys, head_dim=d, dtype=dt, cached=cache is not None,
                   segments=mask.q_segment is not None)
    if kind == "dense":
        return dense_attention(q, k, v, mask, cached=False, dt=dt) if cache is None else \
            dense_attention(q, *cache, mask, cached=True, dt=dt)
    if cache is not None and t == 1:
        return decode_attention(q, *cache, mask, dt=dt)
    if kind == "blockwise":
        if cache is None:
            return blockwise_attention(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), mask, dt=dt)
        return blockwise_attention(q, *cache, mask, dt=dt)
    from jaxrl_llm.models import fused_attention

    if kind == "cudnn":
        return fused_attention.cudnn_attention(q, k, v, mask, cache=cache, dt=dt)
    if kind == "splash":
        return fused_attention.splash_attention(q, k, v, mask, cache=cache, dt=dt)
    raise ValueError(f"model.attention must be one of {KERNELS}, got {kind!r}")
