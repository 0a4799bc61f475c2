"""The accelerator kernels behind ``model.attention``: cuDNN flash attention (NVIDIA GPUs) and Pallas splash
attention (TPUs), fed the structured mask of :class:`jaxrl_llm.models.attention.AttentionMask`.

Neither kernel takes that mask as it is. Both know causality and (splash) segments compared for equality; neither
knows a cached prefix that every segment sees. So:

* **splash** splits the keys of a call with a KV cache into the cached prefix (slots before ``q_offset``, seen by
  every query whose key is valid: no causality, segment ids ``1`` for the queries and ``valid`` for the slots) and
  the call's own keys (causal, segment ids ``segment`` where valid and ``0`` elsewhere, so a padded query sees
  only padding and no row is empty). The two partial attentions merge through their log-sum-exps,
  ``lse = logaddexp(lse_1, lse_2)``, ``out = exp(lse_1 - lse) out_1 + exp(lse_2 - lse) out_2``. Splash's own
  gradient ignores a cotangent on ``lse``, so the merge has its own backward pass: each part's backward kernel
  runs with the *merged* ``out`` and ``lse`` (its probabilities ``exp(s - lse)`` are then those of the full
  softmax and ``D = do . out`` is the full one), which gives the exact gradient of the merged attention. This
  calls splash's forward and backward functions directly (``_splash_attention_forward``,
  ``_splash_attention_bwd``): private names of ``jax.experimental``; tests/test_attention.py runs them in Pallas
  interpret mode on the CPU, so a change there fails a test.
* **cudnn** (through ``jax.nn.dot_product_attention``) without a cache or segments: the rows' valid tokens are
  moved to the front of each row by a stable sort (their order, hence causality between them, is kept), and the
  kernel runs with padding-causal masking and ``query_seq_lengths = key_value_seq_lengths = #valid``; outputs are
  moved back. Linear memory, any left/right padding. With a cache or segments the public interface has no way to
  say "prefix seen by every segment", so the mask goes in as a boolean ``[B, 1, T, S]`` array, which cuDNN turns
  into an additive bias: quadratic in the length (no head axis). ``auto`` therefore takes cudnn only for the
  former and blockwise for the latter.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm.models.attention import AttentionMask

__all__ = ["cudnn_attention", "splash_attention"]


# ---------------------------------------------------------------------------------------------------------------
# cuDNN


def _valid_first(x, order):
    """Rows of ``x [B, T, ...]`` gathered in ``order [B, T]``."""
    return jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)


def cudnn_attention(q, k, v, mask: AttentionMask, *, cache=None, dt, implementation: str = "cudnn"):
    """``jax.nn.dot_product_attention`` with ``implementation`` (``"xla"`` runs the same call on any backend, as
    the tests do). Shapes as :func:`jaxrl_llm.models.attention.attend`."""
    b, t, kv, g, d = q.shape
    qh = q.reshape(b, t, kv * g, d).astype(dt)
    if cache is None and mask.q_segment is None:
        valid = mask.k_valid
        order = jnp.argsort(~valid, axis=1, stable=True)  # valid tokens first, in their order
        count = jnp.sum(valid, axis=1, dtype=jnp.int32)
        out = jax.nn.dot_product_attention(
            _valid_first(qh, order), _valid_first(k.astype(dt), order), _valid_first(v.astype(dt), order),
            is_causal=mask.causal, query_seq_lengths=count, key_value_seq_lengths=count,
            implementation=implementation)
        back = jnp.argsort(order, axis=1)
        return _valid_first(out, back).reshape(b, t, kv, g, d)
    if cache is None:
        keys, values = k.astype(dt), v.astype(dt)
    else:
        keys, values = cache[0].transpose(0, 3, 1, 2).astype(dt), cache[1].transpose(0, 2, 1, 3).astype(dt)
    allowed = mask.block(0, t, 0, keys.shape[1])[:, None]
    out = jax.nn.dot_product_attention(qh, keys, values, mask=allowed, implementation=implementation)
    return out.reshape(b, t, kv, g, d)


# ---------------------------------------------------------------------------------------------------------------
# splash


_LANES = 128  # splash's blocks are multiples of the TPU lane width


def _lanes(n: int) -> int:
    return -(-n // _LANES) * _LANES


def _block(n: int) -> int:
    return next(size for size in (512, 256, _LANES) if n % size == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, q_len: int, kv_len: int, causal: bool, interpret: bool):
    """A splash kernel for one example: ``q [heads, q_len, d]``, ``k, v [kv_heads, kv_len, d]`` (GQA when
    ``kv_heads`` divides ``heads``), both lengths whole multiples of 128."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (q_len, kv_len)
    one = sa.CausalMask(shape) if causal else sa.FullMask(shape)
    bq, bk = _block(q_len), _block(kv_len)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                          block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    with jax.ensure_compile_time_eval():  # the mask tables are constants, made once, never traced values
        return sa.make_splash_mha(sa.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def _collapsed(info):
    """Mask info as splash's entry point hands it to the kernels (leading block axes of the partial blocks
    folded into one)."""
    if info is None or info.partial_mask_blocks is None:
        return info
    blocks = info.partial_mask_blocks
    return info._replace(partial_mask_blocks=blocks.reshape(-1, *blocks.shape[-2:]))


def _part_forward(kernel, q, k, v, segments):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    kw = kernel.kwargs
    out, (lse,) = sk._splash_attention_forward(
        _collapsed(kernel.fwd_mask_info), q, k, v, segments, None, mask_value=kw["mask_value"], is_mqa=False,
        block_sizes=kw["block_sizes"], residual_checkpoint_name=None, save_residuals=True,
        mask_function=kw["mask_function"], attn_logits_soft_cap=None, interpret=kw["interpret"])
    return out, lse


def _part_backward(kernel, q, k, v, segments, out, lse, dout):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    kw = kernel.kwargs
    res = (q, k, v, segments, None, out, lse, _collapsed(kernel.dq_mask_info), _collapsed(kernel.dkv_mask_info))
    grads = sk._splash_attention_bwd(False, kw["mask_value"], False, kw["block_sizes"], None, kw["mask_function"],
                                     None, kw["interpret"], res, dout)
    return grads[3:6]


def _merged_forward(kernels, q, parts):
    outs, lses = zip(*(_part_forward(kern, q, *part) for kern, part in zip(kernels, parts)))
    lse = functools.reduce(jnp.logaddexp, lses)
    out = sum(jnp.exp(l - lse)[..., None] * o.astype(jnp.float32) for o, l in zip(outs, lses))
    return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _merged(kernels, q, parts):
    """Softmax attention of ``q [heads, T, d]`` over the union of the key sets ``parts = ((k, v, segment ids),
    ...)``, one splash kernel each (module docstring)."""
    return _merged_forward(kernels, q, parts)[0]


def _merged_fwd(kernels, q, parts):
    out, lse = _merged_forward(kernels, q, parts)
    return out, (q, parts, out, lse)


def _merged_bwd(kernels, res, dout):
    q, parts, out, lse = res
    dq = jnp.zeros(q.shape, jnp.float32)
    dparts = []
    for kern, (k, v, segments) in zip(kernels, parts):
        dq_i, dk, dv = _part_backward(kern, q, k, v, segments, out, lse, dout)
        dq = dq + dq_i.astype(jnp.float32)
        dparts.append((dk, dv, None))
    return dq.astype(q.dtype), tuple(dparts)


_merged.defvjp(_merged_fwd, _merged_bwd)


def _pad_to(x, n: int, axis: int, value=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def splash_attention(q, k, v, mask: AttentionMask, *, cache=None, dt, interpret: bool = False):
    """Splash attention (module docstring); shapes as :func:`jaxrl_llm.models.attention.attend`. ``interpret``
    runs the Pallas kernels in interpret mode (any backend, slowly)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, kv, g, d = q.shape
    tp = _lanes(t)
    scale = 1.0 / np.sqrt(d)
    qh = _pad_to((q.astype(dt) * jnp.asarray(scale, dt)).reshape(b, t, kv * g, d).transpose(0, 2, 1, 3), tp, 2)
    new_valid = mask.k_valid if cache is None else jax.lax.dynamic_slice_in_dim(mask.k_valid, mask.q_offset, t, 1)
    own = jnp.where(new_valid, 1 if mask.q_segment is None else mask.q_segment, 0).astype(jnp.int32)
    own = _pad_to(own, tp, 1)
    kernels = [_splash_kernel(kv * g, tp, tp, mask.causal, interpret)]
    parts = [(_pad_to(k.astype(dt).transpose(0, 2, 1, 3), tp, 2), _pad_to(v.astype(dt).transpose(0, 2, 1, 3), tp, 2),
              sa.SegmentIds(q=own, kv=own))]
    before = 0 if cache is None else cache[0].shape[3] - t  # the only slots that can precede q_offset
    if before:  # the cached prompt every query sees
        n = _lanes(before)
        k_pre = _pad_to(cache[0][..., :before].transpose(0, 1, 3, 2).astype(dt), n, 2)
        v_pre = _pad_to(cache[1][:, :, :before].astype(dt), n, 2)
        seen = _pad_to(((jnp.arange(before) < mask.q_offset) & mask.k_valid[:, :before]).astype(jnp.int32), n, 1)
        kernels.append(_splash_kernel(kv * g, tp, n, False, interpret))
        parts.append((k_pre, v_pre, sa.SegmentIds(q=jnp.ones((b, tp), jnp.int32), kv=seen)))
    out = jax.vmap(lambda qb, pb: _merged(tuple(kernels), qb, pb))(qh, tuple(parts))
    return out[:, :, :t].transpose(0, 2, 1, 3).reshape(b, t, kv, g, d)
