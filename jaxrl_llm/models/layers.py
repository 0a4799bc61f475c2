"""Building blocks of the decoder: RMSNorm, rotary embeddings, attention with a KV cache, SwiGLU MLP, MoE.

Weights are stored in "JAX layout" (input dimension first) and carry logical axis names in their
``logical_axes`` metadata; :mod:`jaxrl_llm.parallel` maps those names to mesh axes.
"""
from __future__ import annotations

import functools
import math

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_llm.models.attention import AttentionMask, attend
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.moe import moe_forward


@functools.partial(jax.jit, static_argnums=(1,))
def _flat_normal(key: jax.Array, size: int) -> jax.Array:
    return jax.random.normal(key, (size,), jnp.float32)


def _normal(key: jax.Array, shape, dtype, std: float) -> jax.Array:
    """``std * N(0, 1)`` of ``shape``, drawn as a flat vector of the next power-of-two length and cut.

    Compiling the random generator dominates building a small model op by op; power-of-two lengths mean only a
    handful of distinct generator programs, whatever the parameter shapes.
    """
    n = math.prod(shape)
    size = 1 << max(n - 1, 0).bit_length()
    return _cut(_flat_normal(key, size), tuple(shape), jnp.dtype(dtype), float(std))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _cut(flat: jax.Array, shape, dtype, std: float) -> jax.Array:
    return (std * flat[:math.prod(shape)]).reshape(shape).astype(dtype)


def param(rngs: nnx.Rngs, shape, axes, dtype, *, init: str = "normal", std: float = 0.02) -> nnx.Param:
    """A parameter with logical axis names. Random init is only for fresh models; loaders overwrite it."""
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = _normal(rngs.params(), tuple(shape), dtype, std)
    return nnx.Param(value, logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, axis_name: str, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = param(rngs, (dim,), (axis_name,), param_dtype, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        # the weight multiplies after casting back, as in the reference implementations
        return self.weight[...].astype(dtype) * x32.astype(dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies ``[head_dim / 2]``, with llama3 frequency-dependent scaling when configured."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    scaling = cfg.rope_scaling_dict
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def _rope_tables(emb: jax.Array) -> tuple[jax.Array, jax.Array]:
    sin = jnp.sin(emb)
    half = emb.shape[-1] // 2
    return jnp.cos(emb), jnp.concatenate([-sin[..., :half], sin[..., half:]], axis=-1)


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(cos, signed sin)`` tables ``[B, T, 1, head_dim]`` of ``positions [B, T]`` for :func:`apply_rope`.

    Made once per forward and shared by every layer's queries and keys. XLA on CPU evaluates sine and cosine
    element by element, 10-20x slower than ``exp``, and left to itself computes them inside every fusion that
    rotates (once per head, and again in the backward pass). A conditional is a boundary no fusion crosses, so
    the tables are made in one. Both branches are the same, so the predicate cannot change the result; it is read
    from ``inv_freq``, which every device holds and XLA does not fold (it is made from an iota), so that the
    conditional survives compilation. The sine's first half is negated so that the rotation needs no negation."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    if jax.default_backend() != "cpu":  # elsewhere a conditional costs a device-to-host read of its predicate
        return _rope_tables(emb)
    return jax.lax.cond(inv_freq[0] > 0, _rope_tables, _rope_tables, emb)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate ``x [B, T, heads, head_dim]`` by the tables of :func:`rope_tables` (rotate-half convention), in
    float32."""
    cos, sin = rope
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    swapped = jnp.concatenate([x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + swapped * sin).astype(x.dtype)


@jax.custom_vjp
def project(x, w):
    """``x [..., D] @ w [D, F]``, with a hand-written backward pass.

    The weight gradient is formed as ``x^T @ dy``, transposing the saved input. The automatic backward put the
    output gradient on the left of that product, so on CPU XLA transposed the gradient instead, computing the
    rotary and q/k-norm backward that produce it inside the transpose, in column order: the GRPO benchmark's
    update ran about 7% slower.
    """
    return x @ w


def _project_fwd(x, w):
    return x @ w, (x, w)


def _project_bwd(res, dy):
    x, w = res
    xs, dys = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    return (dy @ w.T).astype(x.dtype), (xs.T @ dys).astype(w.dtype)


project.defvjp(_project_fwd, _project_bwd)


@flax.struct.dataclass
class LayerCache:
    k: jax.Array  # [B, n_kv, head_dim, S]
    v: jax.Array


class Attention(nnx.Module):
    """Projections, rotary embeddings, the KV cache and the attention kernel ``attention`` (see
    :mod:`jaxrl_llm.models.attention`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention: str = "auto"):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.dtype = dtype
        self.attention = attention
        self.q = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), param_dtype)
        self.k = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.v = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.o = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), param_dtype)
        if cfg.qkv_bias:
            self.q_bias = param(rngs, (h, hd), ("heads", "head_dim"), param_dtype, init="zeros")
            self.k_bias = param(rngs, (kv, hd), ("kv_heads", "head_dim"), param_dtype, init="zeros")
            self.v_bias = param(rngs, (kv, hd), ("kv_heads", "head_dim"), param_dtype, init="zeros")
        if cfg.o_bias:
            self.o_bias = param(rngs, (d,), ("embed",), param_dtype, init="zeros")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, "head_dim", rngs=rngs, param_dtype=param_dtype)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, "head_dim", rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x, rope, mask: AttentionMask, cache: LayerCache | None, cache_index):
        """``mask``: which key slots each query may attend to (the sequence's own, or the cache's slots)."""
        cfg, dt = self.cfg, self.dtype
        x = x.astype(dt)
        b, t, d = x.shape
        q = project(x, self.q[...].astype(dt).reshape(d, -1)).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = project(x, self.k[...].astype(dt).reshape(d, -1)).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = project(x, self.v[...].astype(dt).reshape(d, -1)).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qkv_bias:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, rope)
        k = apply_rope(k, rope)
        group = cfg.num_heads // cfg.num_kv_heads
        qg = q.reshape(b, t, cfg.num_kv_heads, group, cfg.head_dim)
        slots = None
        if cache is not None:
            # the cache is kept heads-major, keys as [B, kv, d, S] and values as [B, kv, S, d]: both decode-step
            # products then reduce over a non-minor axis (vectorised along S resp. d, no horizontal sums), and the
            # update writes only the new slots in place
            k_all = jax.lax.dynamic_update_slice_in_dim(
                cache.k, k.transpose(0, 2, 3, 1).astype(cache.k.dtype), cache_index, axis=3)
            v_all = jax.lax.dynamic_update_slice_in_dim(
                cache.v, v.transpose(0, 2, 1, 3).astype(cache.v.dtype), cache_index, axis=2)
            cache = LayerCache(k_all, v_all)
            slots = (k_all, v_all)
        out = attend(self.attention, qg, k, v, mask, cache=slots, dt=dt)
        out = project(out.reshape(b, t, cfg.num_heads * cfg.head_dim), self.o[...].astype(dt).reshape(-1, d))
        if cfg.o_bias:
            out = out + self.o_bias[...].astype(dt)
        return out, cache


@jax.custom_vjp
def swiglu(x, gate, up, down):
    """SwiGLU MLP ``(silu(x @ gate) * (x @ up)) @ down`` over the last axis of ``x``.

    The backward pass is written by hand: it recomputes the two input products instead of holding them, and
    forms every weight gradient from the ``[tokens, embed]``-wide arrays (``x`` and the output gradient), so the
    only transposes are of those; the automatic one transposed the ``[tokens, mlp]`` activations, which on CPU took
    about a third of the MLP's backward time. Reverse-mode only (``jax.grad``/``vjp``), like any ``custom_vjp``.
    """
    return (jax.nn.silu(x @ gate) * (x @ up)) @ down


def _swiglu_fwd(x, gate, up, down):
    return swiglu(x, gate, up, down), (x, gate, up, down)


def _swiglu_bwd(res, dy):
    x, gate, up, down = res
    xs, dys = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    g, u = xs @ gate, xs @ up
    sig = jax.nn.sigmoid(g)
    silu = g * sig
    dh = dys @ down.T
    dg = dh * u * sig * (1 + g * (1 - sig))  # d silu(g) / dg = sig * (1 + g * (1 - sig))
    du = dh * silu
    xt = xs.T
    dx = dg @ gate.T + du @ up.T
    return dx.reshape(x.shape), xt @ dg, xt @ du, (dys.T @ (silu * u)).T


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nnx.Module):
    def __init__(self, d: int, f: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.dtype = dtype
        self.gate = param(rngs, (d, f), ("embed", "mlp"), param_dtype)
        self.up = param(rngs, (d, f), ("embed", "mlp"), param_dtype)
        self.down = param(rngs, (f, d), ("mlp", "embed"), param_dtype)

    def __call__(self, x):
        dt = self.dtype
        return swiglu(x.astype(dt), self.gate[...].astype(dt), self.up[...].astype(dt), self.down[...].astype(dt))


class MoE(nnx.Module):
    """Top-k routed mixture of SwiGLU experts (shared-nothing), Qwen3-MoE style.

    The router's softmax is taken in float32 over all experts, the top-k probabilities are optionally
    renormalised (``norm_topk_prob``). ``forced_experts [B, T, k]`` replaces the top-k choice (routing replay);
    the gate weights are then the router probabilities at the forced experts. Each token runs through its k
    experts only: tokens are grouped by expert into tiles of grouped products, dropless, and the experts are
    sharded over the ``expert`` mesh axis (:mod:`jaxrl_llm.models.moe`).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        d, f, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        self.cfg = cfg
        self.dtype = dtype
        self.router = param(rngs, (d, e), ("embed", "experts"), param_dtype)
        self.gate = param(rngs, (e, d, f), ("experts", "embed", "mlp"), param_dtype)
        self.up = param(rngs, (e, d, f), ("experts", "embed", "mlp"), param_dtype)
        self.down = param(rngs, (e, f, d), ("experts", "mlp", "embed"), param_dtype)

    def __call__(self, x, forced_experts=None):
        cfg, dt = self.cfg, self.dtype
        return moe_forward(x.astype(dt), self.router[...].astype(dt), self.gate[...].astype(dt),
                           self.up[...].astype(dt), self.down[...].astype(dt), k=cfg.num_experts_per_tok,
                           norm_topk_prob=cfg.norm_topk_prob, forced_experts=forced_experts)
