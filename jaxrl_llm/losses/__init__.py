"""Pure-functional RL loss kernels for LLMs (jit-able, shardable; all losses are to be minimised).

    import jaxrl_llm.losses as L
    loss, metrics = L.ppo_clip(logp, old_logp, adv, mask, clip_low=0.2, clip_high=0.28)
"""
from jaxrl_llm.losses.aggregate import AGG_MODES, aggregate, global_normalizer
from jaxrl_llm.losses.correction import rollout_correction
from jaxrl_llm.losses.entropy import entropy_from_logits, logprobs_from_logits, token_logprobs_and_entropy
from jaxrl_llm.losses.kl import KL_ESTIMATORS, kl
from jaxrl_llm.losses.policy import POLICY_LOSSES, cispo, get_policy_loss, gspo, gspo_token, pg, ppo_clip
from jaxrl_llm.losses.value import value_loss

__all__ = [
    "AGG_MODES", "KL_ESTIMATORS", "POLICY_LOSSES", "aggregate", "cispo", "entropy_from_logits",
    "get_policy_loss", "global_normalizer", "gspo", "gspo_token", "kl", "logprobs_from_logits", "pg", "ppo_clip",
    "rollout_correction",
    "token_logprobs_and_entropy", "value_loss",
]
