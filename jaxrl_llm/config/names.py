"""The allowed values of the settings that name a choice, and the mesh and logical axes.

They mirror the loss/advantage/model libraries (``tests/test_config.py`` checks that they agree) but are kept here
so that reading a config needs neither JAX nor the model code.
"""
from __future__ import annotations

__all__ = [
    "POLICY_LOSSES", "AGG_MODES", "KL_ESTIMATORS", "ADVANTAGES", "GROUP_ADVANTAGES", "CRITICS", "DTYPES",
    "REMAT", "ATTENTION", "SOURCES", "TRUNCATE", "TASKS", "SCHEDULES", "CONSISTENCY", "COV_PENALTIES", "ROLLOUT_IS",
    "ROLLOUT_MASK", "MESH_AXES", "LOGICAL_AXES", "CLIPPED_LOSSES",
]

POLICY_LOSSES = ("ppo_clip", "gspo", "gspo_token", "cispo", "pg")
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3", "k3+")
GROUP_ADVANTAGES = ("grpo", "drgrpo", "rloo", "reinforce_pp_baseline", "passk")  # baselines from the n samples
ADVANTAGES = GROUP_ADVANTAGES + ("reinforce_pp", "gae")
CRITICS = ("separate",)  # a separate value model: a trunk initialised from the policy plus a linear value head
DTYPES = ("float32", "bfloat16")
REMAT = ("auto", "none", "full", "dots")
ATTENTION = ("auto", "dense", "blockwise", "cudnn", "splash")  # jaxrl_llm.models.attention.KERNELS
SOURCES = ("task", "gym", "jsonl", "parquet", "hf_disk")
TRUNCATE = ("error", "left", "right")  # a prompt longer than data.max_prompt_tokens: error, or cut on that side
TASKS = ("arith",)
SCHEDULES = ("constant", "cosine", "linear")
CONSISTENCY = ("default", "exact")
COV_PENALTIES = ("none", "clip_cov", "kl_cov")
ROLLOUT_IS = ("none", "token", "sequence")
ROLLOUT_MASK = ("none", "token", "sequence", "geometric")
MESH_AXES = ("data", "fsdp", "tensor", "expert")
LOGICAL_AXES = ("batch", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "experts")  # of mesh.rules
CLIPPED_LOSSES = ("ppo_clip", "gspo", "gspo_token", "cispo")
