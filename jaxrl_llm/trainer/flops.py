"""Model FLOPs of one RL step, for the throughput and MFU metrics.

Counted are the multiply-adds the model's maths needs for the tokens actually processed (padding excluded), in
every pass the step really runs; a multiply-add is 2 FLOPs.

One forward over a token: ``2 W`` for the weight products, ``W`` = the weights a token is multiplied with
(attention projections ``d (h + 2 kv) hd + h hd d``, the MLP ``3 d f`` or, in a mixture-of-experts layer, the
router ``d E`` and the ``k`` active experts ``3 d f_e k``, and the unembedding ``V d``; the embedding is a lookup
and costs nothing). Attention adds ``4 L h hd`` per (query, key) pair (``q k^T`` and the weighted sum of values,
``2 hd`` each per head and layer). Causal attention pairs a query at position ``t`` (0-based) with ``t + 1`` keys,
so a sequence of ``T`` tokens has ``T (T + 1) / 2`` pairs, about half the ``T^2`` a full attention matrix holds.
A response of ``r`` tokens after a prompt of ``p`` has ``r p + r (r + 1) / 2`` pairs.

When the ``n`` responses of a prompt share its keys and values (the sampler's prefill always; scoring and updates
with ``train.share_prompts``) the prompt's tokens and its own ``p (p + 1) / 2`` pairs count once per group,
otherwise once per response. A backward pass costs twice its forward, so an update epoch is 3 forwards.

Passes of a step: sampling (1 forward, prompts shared); scoring the old log-probs (skipped when they come from
the update's own forward) and the reference log-probs (``kl_coef > 0``), 1 forward each; the BuPO warm-up's
internal-layer scoring (counted as a whole forward: an upper bound); the update, ``3 ppo_epochs`` forwards; a
separate critic (PPO) adds its values forward and ``3 ppo_epochs`` forwards of its update, without the
unembedding and per response. Not counted: rollouts that dynamic sampling discarded, and diagnostics
(``log.layer_entropy``, MoE routing agreement).
"""
from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["weight_flops_per_token", "attention_flops_per_pair", "forward_flops", "StepPasses", "step_passes",
           "rl_step_flops"]


def _weights_per_token(cfg, unembed: bool = True) -> int:
    d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attention = d * (h + 2 * kv) * hd + h * hd * d
    total = 0
    for i in range(cfg.num_layers):
        if cfg.layer_is_moe(i):
            mlp = d * cfg.num_experts + 3 * d * cfg.moe_intermediate_size * cfg.num_experts_per_tok
        else:
            mlp = 3 * d * cfg.intermediate_size
        total += attention + mlp
    return total + (cfg.vocab_size * d if unembed else 0)


def weight_flops_per_token(cfg, *, unembed: bool = True) -> int:
    """``2 W``: the weight products of one token's forward (``unembed=False``: a critic trunk without the
    unembedding)."""
    return 2 * _weights_per_token(cfg, unembed)


def attention_flops_per_pair(cfg) -> int:
    """``4 L h hd``: attention FLOPs of one (query, key) pair over all layers."""
    return 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim


def _tokens_and_pairs(prompt_lengths, response_lengths, shared: bool) -> tuple[float, float]:
    """Tokens and causal attention pairs of groups of responses ``[G, n]`` after prompts ``[G]``."""
    p = np.asarray(prompt_lengths, np.float64)
    r = np.asarray(response_lengths, np.float64)
    if r.ndim != 2 or r.shape[0] != p.shape[0]:
        raise ValueError(f"response_lengths must be [groups, n] with groups = len(prompt_lengths) = {p.shape[0]}, "
                         f"got shape {r.shape}")
    prompt_copies = 1 if shared else r.shape[1]
    tokens = prompt_copies * p.sum() + r.sum()
    pairs = prompt_copies * (p * (p + 1) / 2).sum() + (r * p[:, None] + r * (r + 1) / 2).sum()
    return float(tokens), float(pairs)


def forward_flops(cfg, prompt_lengths, response_lengths, *, shared: bool, unembed: bool = True) -> float:
    """FLOPs of one forward over groups of responses ``[G, n]`` (lengths) after their prompts ``[G]``."""
    tokens, pairs = _tokens_and_pairs(prompt_lengths, response_lengths, shared)
    return weight_flops_per_token(cfg, unembed=unembed) * tokens + attention_flops_per_pair(cfg) * pairs


@dataclasses.dataclass(frozen=True)
class StepPasses:
    """The passes one RL step runs over its batch."""

    scoring: int  # policy-model forwards before the update (old log-probs, reference log-probs, BuPO)
    scoring_shared: bool  # prompts run once per group in them
    update_epochs: int  # forward + backward over the batch, this many times
    update_shared: bool
    critic_epochs: int = 0  # > 0: a separate critic (values forward + this many updates)
    update_decodes: int = 0  # exact consistency: a decode pass over the whole batch (prompts shared) per update


def step_passes(cfg, *, old_logp_pass: bool, bupo_warmup: bool, score_group: int,
                update_group: int) -> StepPasses:
    """The passes a run config makes in a step (``score_group``/``update_group``: rows per shared prompt)."""
    a = cfg.algorithm
    scoring = (1 if old_logp_pass else 0) + (1 if a.kl_coef > 0 else 0) + (1 if bupo_warmup else 0)
    exact = cfg.rollout.consistency == "exact" and not bupo_warmup  # a BuPO warm-up trains a layer's read-out
    return StepPasses(scoring=scoring, scoring_shared=score_group > 1, update_epochs=a.ppo_epochs,
                      update_shared=update_group > 1, critic_epochs=a.ppo_epochs if a.advantage == "gae" else 0,
                      update_decodes=a.ppo_epochs * a.minibatches if exact else 0)


def rl_step_flops(cfg, prompt_lengths, response_lengths, passes: StepPasses) -> dict[str, float]:
    """FLOPs per pass (``sample``, ``score``, ``update``, ``critic``) and their ``total``, for prompts of
    ``prompt_lengths [G]`` tokens with ``n`` responses each of ``response_lengths [G, n]`` tokens."""
    def fwd(shared, unembed=True):
        return forward_flops(cfg, prompt_lengths, response_lengths, shared=shared, unembed=unembed)

    out = {"sample": fwd(True),
           "score": passes.scoring * fwd(passes.scoring_shared) if passes.scoring else 0.0,
           "update": 3 * passes.update_epochs * fwd(passes.update_shared) + passes.update_decodes * fwd(True),
           "critic": (1 + 3 * passes.critic_epochs) * fwd(False, unembed=False) if passes.critic_epochs else 0.0}
    out["total"] = sum(out.values())
    return out
