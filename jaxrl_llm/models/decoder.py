"""The decoder: token embedding, a stack of pre-norm attention + (MoE) MLP blocks, final RMSNorm.

The forward returns final hidden states, not logits: the unembedding is applied by the loss/sampler code so the
chunked log-prob kernel can avoid materialising ``[batch, time, vocab]`` logits.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_llm.models.attention import KERNELS, AttentionMask, check_kernel
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.layers import MLP, Attention, LayerCache, MoE, RMSNorm, param, rope_inv_freq, rope_tables
from jaxrl_llm.models.remat import REMAT_POLICIES, rematerialised
from jaxrl_llm.parallel import constrain_rows

ATTENTION_KERNELS = KERNELS

__all__ = ["ATTENTION_KERNELS", "Decoder", "DecoderOutput", "KVCache", "init_cache", "REMAT_POLICIES"]


@flax.struct.dataclass
class KVCache:
    """Fixed-size key/value cache for incremental decoding (a pytree; carried through ``lax.while_loop``)."""

    # one array per layer (not one stacked array), so a decode step updates each layer's slots in place
    k: tuple[jax.Array, ...]  # L x [B, n_kv, head_dim, S]
    v: tuple[jax.Array, ...]  # L x [B, n_kv, S, head_dim]
    index: jax.Array  # int32 scalar: next free slot
    mask: jax.Array  # bool [B, S]: slot holds a real token

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]

    def map_batch(self, fn) -> "KVCache":
        """Apply ``fn`` to every per-row array (keys, values, mask), e.g. to repeat rows."""
        return self.replace(k=tuple(fn(x) for x in self.k), v=tuple(fn(x) for x in self.v), mask=fn(self.mask))

    def with_slots(self, max_len: int) -> "KVCache":
        """The cache extended with free slots to ``max_len``, its rows split over the mesh's batch axes.

        Prompts are run once per group into a cache of just their slots: a step's few prompts may not divide over
        the devices (8 prompts on 64), and a cache of the full length made for them would be held whole on every
        device; the responses' rows, ``n`` per prompt, divide."""
        def grow(x, axis):
            pad = [(0, 0)] * x.ndim
            pad[axis] = (0, max_len - self.max_len)
            return constrain_rows(jnp.pad(constrain_rows(x), pad))

        return self.replace(k=tuple(grow(x, 3) for x in self.k), v=tuple(grow(x, 2) for x in self.v),
                            mask=grow(self.mask, 1))


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    k_shape = (batch, cfg.num_kv_heads, cfg.head_dim, max_len)
    v_shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    return KVCache(k=tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.num_layers)),
                   v=tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.num_layers)),
                   index=jnp.zeros((), jnp.int32), mask=jnp.zeros((batch, max_len), bool))


@flax.struct.dataclass
class DecoderOutput:
    hidden: jax.Array  # [B, T, D] after the final norm
    cache: KVCache | None = None
    residuals: jax.Array | None = None  # [L + 1, B, T, D] residual stream (before the final norm)
    router_logits: jax.Array | None = None  # [L_moe, B, T, E]
    experts: jax.Array | None = None  # [L_moe, B, T, k]


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, index: int, *, rngs, dtype, param_dtype, attention: str = "auto"):
        self.is_moe = cfg.layer_is_moe(index)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", rngs=rngs, param_dtype=param_dtype)
        self.attn = Attention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention=attention)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", rngs=rngs, param_dtype=param_dtype)
        if self.is_moe:
            self.mlp = MoE(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x, rope, mask, cache, cache_index, forced):
        h, cache = self.attn(self.attn_norm(x), rope, mask, cache, cache_index)
        x = x + h.astype(x.dtype)
        logits = experts = None
        if self.is_moe:
            h, logits, experts = self.mlp(self.mlp_norm(x), forced)
        else:
            h = self.mlp(self.mlp_norm(x))
        return x + h.astype(x.dtype), cache, logits, experts


class Decoder(nnx.Module):
    """Llama / Qwen2 / Qwen3 / Qwen3-MoE decoder (see :class:`ModelConfig`).

    ``remat``: activation rematerialisation per layer (:mod:`jaxrl_llm.models.remat`); ``attention``: the
    attention kernel (:mod:`jaxrl_llm.models.attention`), checked against the backend here."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: str = "none", attention: str = "auto"):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat must be one of {REMAT_POLICIES}, got {remat!r}")
        check_kernel(attention, dtype=dtype, head_dim=cfg.head_dim)
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        self.attention = attention
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype)
        self.layers = nnx.List([DecoderLayer(cfg, i, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                             attention=attention) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", rngs=rngs, param_dtype=param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), param_dtype)

    def unembedding(self) -> jax.Array:
        """``[D, V]`` matrix with ``logits = hidden @ unembedding()``."""
        if self.cfg.tie_word_embeddings:
            return self.embed[...].T
        return self.lm_head[...]

    def final_norm(self, h: jax.Array) -> jax.Array:
        return self.norm(h)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Full logits (fp32) from hidden states; only for small vocabularies, tests and decoding steps."""
        return jnp.einsum("btd,dv->btv", hidden, self.unembedding().astype(hidden.dtype),
                          preferred_element_type=jnp.float32)

    def __call__(self, tokens, positions, *, attention_mask=None, segment_ids=None, cache: KVCache | None = None,
                 return_residuals: bool = False, forced_experts=None) -> DecoderOutput:
        cfg = self.cfg
        if tokens.ndim != 2 or positions.shape != tokens.shape:
            raise ValueError(f"tokens and positions must both be [batch, time]; got {tokens.shape} and "
                             f"{positions.shape}")
        b, t = tokens.shape
        valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        if segment_ids is not None:  # packed sequences; with a cache, every packed one continues the cached prefix
            segment_ids = segment_ids.astype(jnp.int32)
            valid = valid & (segment_ids > 0)
        if forced_experts is not None and forced_experts.shape[:3] != (cfg.num_moe_layers, b, t):
            raise ValueError(f"forced_experts must be [{cfg.num_moe_layers}, {b}, {t}, k], got "
                             f"{forced_experts.shape}")

        if cache is None:
            cache_index = jnp.zeros((), jnp.int32)
            mask = AttentionMask(q_offset=cache_index, k_valid=valid, q_segment=segment_ids, k_segment=segment_ids)
        else:
            if t > cache.max_len:
                raise ValueError(f"{t} tokens do not fit a KV cache of {cache.max_len} slots")
            cache_index = cache.index
            slot_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, valid, cache_index, axis=1)
            slot_segment = None
            if segment_ids is not None:  # cached slots (segment 0) are seen by every segment, new ones by their own
                slot_segment = jax.lax.dynamic_update_slice_in_dim(
                    jnp.zeros(cache.mask.shape, jnp.int32), segment_ids, cache_index, axis=1)
            mask = AttentionMask(q_offset=cache_index, k_valid=slot_mask, q_segment=segment_ids,
                                 k_segment=slot_segment)

        rope = rope_tables(positions, rope_inv_freq(cfg))
        x = constrain_rows(self.embed[...][tokens].astype(self.dtype))
        residuals = [x] if return_residuals else None
        router_logits, experts = [], []
        new_k, new_v = [], []
        call = rematerialised(self.remat)
        moe_i = 0
        anchor = x  # the previous layer's input: a layer's weights are gathered once it exists (remat.py)
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else LayerCache(cache.k[i], cache.v[i])
            forced = None
            if layer.is_moe and forced_experts is not None:
                forced = forced_experts[moe_i]
            layer_input = x
            x, layer_cache, logits, chosen = call(layer, anchor, x, rope, mask, layer_cache, cache_index, forced)
            anchor = layer_input
            x = constrain_rows(x)
            if layer.is_moe:
                router_logits.append(logits)
                experts.append(chosen)
                moe_i += 1
            if cache is not None:
                new_k.append(layer_cache.k)
                new_v.append(layer_cache.v)
            if return_residuals:
                residuals.append(x)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(k=tuple(new_k), v=tuple(new_v), index=cache.index + t, mask=slot_mask)
        return DecoderOutput(
            hidden=self.norm(x),
            cache=new_cache,
            residuals=jnp.stack(residuals) if return_residuals else None,
            router_logits=jnp.stack(router_logits) if router_logits else None,
            experts=jnp.stack(experts) if experts else None,
        )
