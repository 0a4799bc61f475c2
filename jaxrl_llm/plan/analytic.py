"""The formula estimate of a step's per-device memory."""
from __future__ import annotations

from jaxrl_llm.plan.memory import MemoryPlan, step_shapes

_ITEMSIZE = {"float32": 4, "bfloat16": 2}


def _float_fields(cfg) -> int:
    """float32 ``[N, R]`` fields of the update's Experience: advantages, old and sampler log-probs, and the
    optional reference log-probs and rollout-correction weights."""
    a = cfg.algorithm
    kl_in_loss = a.kl_coef > 0 and not a.kl_in_reward
    return 3 + kl_in_loss + (a.rollout_is != "none" or a.rollout_mask != "none")


def _div(n: int, parts: int) -> int:
    """The size of one shard when ``parts`` divides ``n``, else ``n`` (the trainer then replicates)."""
    return n // parts if parts > 1 and n % parts == 0 else n


def analytic_plan(cfg, mc, sizes: dict[str, int]) -> MemoryPlan:
    """Formula estimate: parameters / shards, AdamW 2 x parameters, activations per token and layer, and
    KV cache = layers x 2 x rows x max_len x kv_heads x head_dim x bytes / shards."""
    pbytes, cbytes = _ITEMSIZE[cfg.model.param_dtype], _ITEMSIZE[cfg.model.dtype]
    sbytes = _ITEMSIZE[cfg.rollout.sampler_dtype or cfg.model.dtype]
    fsdp, tensor, expert = sizes["fsdp"], sizes["tensor"], sizes["expert"]
    s = step_shapes(cfg, sizes)
    expert_params = mc.num_moe_layers * 3 * mc.hidden_size * mc.moe_intermediate_size * mc.num_experts
    params = ((mc.num_params() - expert_params) * pbytes // (fsdp * tensor)
              + expert_params * pbytes // (fsdp * tensor * expert))
    opt = 2 * params  # mu and nu in the parameter dtype
    a = cfg.algorithm
    ref = params if a.kl_coef > 0 else 0
    critic = params + opt if a.advantage == "gae" else 0

    t = s.prompt + s.response
    micro_rows = max(s.micro // s.dp, 1)
    batch = s.num_micro * micro_rows * (5 * s.prompt + s.response * (5 + 4 * _float_fields(cfg)))
    # accumulated and current gradients, then AdamW's updates and new moments before the non-finite guard
    grads = 2 * params
    opt_tmp = opt + params
    acts = _train_activations(mc, cfg, micro_rows, t, tensor, cbytes)
    vocab_dev = _div(mc.vocab_size, tensor)
    logprob_chunk = min(cfg.train.logprob_chunk, s.response) * vocab_dev * 4 * 3  # per row: 3 float32 [chunk, vocab]
    logprob = micro_rows * logprob_chunk
    # the log-prob kernel multiplies a device's rows by the whole [embed, vocab] unembedding (gathered over fsdp,
    # as a layer's weights are) and sums its gradient in float32 until the last chunk
    unembed = mc.hidden_size * vocab_dev
    unembed_gathered = unembed * pbytes if fsdp > 1 else 0
    rows_dev = _div(s.rows, s.dp)
    k = cfg.rollout.sampler_devices  # disaggregated: k devices, each with all the weights and rows / k
    sample_rows = _div(s.rows, k) if k else rows_dev
    kv_heads = mc.num_kv_heads if k else _div(mc.num_kv_heads, tensor)
    kv = mc.num_layers * 2 * sample_rows * t * kv_heads * mc.head_dim * sbytes
    sample_weights = mc.num_params() * pbytes if k else params
    cast = sample_weights * sbytes // pbytes if sbytes != pbytes else 0  # weights cast to rollout.sampler_dtype
    sample_logits = sample_rows * mc.vocab_size * 4 * 4  # logits, scaled, filtered, probabilities
    # the sampler gathers the unembedding over fsdp once for the whole generation (sampling/sampler.py)
    sample_unembed = unembed * sbytes if fsdp > 1 and not k else 0
    score_dev = _div(s.score_micro, s.dp)  # scoring runs a micro-batch of whole groups at a time
    score = _layer_forward(mc, cfg, score_dev, t, tensor, cbytes) + unembed_gathered + score_dev * logprob_chunk
    return MemoryPlan(method="analytic", params=params, opt_state=opt, ref_params=ref, critic=critic, batch=batch,
                      sampler_copy=params if cfg.rollout.async_rollout and not k else 0, disaggregated=bool(k),
                      update_temp=grads + opt_tmp + acts + logprob + unembed_gathered + 4 * unembed, kv_cache=kv,
                      sample_temp=kv + sample_logits + cast + sample_unembed, sample_io=sample_weights if k else 0,
                      score_temp=score)


def _token_layer_bytes(mc, tensor: int, cbytes: int) -> int:
    """Bytes per token one layer keeps for its backward pass (norms, q/k/v before and after rotary, attention
    output, MLP gate/up/product); heads and MLP columns are split over the tensor axis.

    A routed MoE layer (``models/moe.py``) holds no per-assignment activations: its backward pass recomputes them
    tile by tile. It keeps the router's float32 logits and probabilities, the k gate weights and experts, and the
    tile plan (two int32 per padded row, at most about 1.25 rows per assignment)."""
    d, hd = mc.hidden_size, mc.head_dim
    heads, kv = _div(mc.num_heads, tensor), _div(mc.num_kv_heads, tensor)
    if mc.is_moe:
        k = mc.num_experts_per_tok
        mlp = 4 * 2 * mc.num_experts + 8 * k + 10 * k
    else:
        mlp = cbytes * 3 * _div(mc.intermediate_size, tensor)
    return cbytes * (4 * d + (3 * heads + 4 * kv) * hd) + mlp + 4 * 2 * d  # + float32 norm statistics


def _layer_forward(mc, cfg, rows: int, t: int, tensor: int, cbytes: int) -> int:
    """One layer's activations for ``rows`` sequences of ``t`` tokens. Dense attention keeps float32 scores and
    probabilities ``[t, t]`` per head; the blockwise, splash and cuDNN kernels keep one float32 log-sum-exp per
    query and hold one block of scores at a time."""
    from jaxrl_llm.models.attention import CPU_DENSE_MAX_KEYS, KEY_BLOCK, QUERY_BLOCK

    heads = _div(mc.num_heads, tensor)
    kind = cfg.model.attention
    if kind == "dense" or (kind == "auto" and t <= CPU_DENSE_MAX_KEYS):
        scores = rows * heads * t * t * (4 + cbytes)
    else:
        scores = rows * heads * (t * 4 + min(t, QUERY_BLOCK) * KEY_BLOCK * (4 + cbytes))
    return rows * t * _token_layer_bytes(mc, tensor, cbytes) + scores


def _train_activations(mc, cfg, rows: int, t: int, tensor: int, cbytes: int) -> int:
    """Activations saved for the backward pass of one micro-batch, by remat policy."""
    from jaxrl_llm.models.remat import resolve_remat

    layer = _layer_forward(mc, cfg, rows, t, tensor, cbytes)
    remat = resolve_remat(cfg.model.remat, cfg.rollout.max_new_tokens)
    if remat == "full":  # only each layer's input is kept; one layer is recomputed at a time
        return mc.num_layers * rows * t * mc.hidden_size * cbytes + layer
    if remat == "dots":  # matmul outputs without batch dimensions are kept
        d, hd = mc.hidden_size, mc.head_dim
        kept = cbytes * (2 * d + (_div(mc.num_heads, tensor) + 2 * _div(mc.num_kv_heads, tensor)) * hd
                         + 2 * _div(mc.intermediate_size, tensor))
        return mc.num_layers * rows * t * kept + layer
    return mc.num_layers * layer
