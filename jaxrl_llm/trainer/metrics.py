"""What a step logs about its rollouts (rewards, pass@k, lengths) and its throughput."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxrl_llm.distributed import host
from jaxrl_llm.metrics import mean_pass_at_k
from jaxrl_llm.sampling import Rollout
from jaxrl_llm.trainer.flops import StepPasses, rl_step_flops

__all__ = ["rollout_metrics", "throughput"]


def rollout_metrics(ro: Rollout, rewards: np.ndarray, per_fn: dict[str, np.ndarray], n: int) -> dict[str, float]:
    """Reward statistics, pass@k over each prompt's ``n`` samples (a sample is correct when the first reward
    function scores it above 0), response lengths and how many responses hit the length budget."""
    lengths = host(ro.lengths)
    correct = (next(iter(per_fn.values())) > 0).reshape(-1, n)
    ks = sorted({1, n} | {k for k in (2, 4, 8, 16) if k <= n})
    out = {f"pass@{k}": v for k, v in mean_pass_at_k(correct, ks).items()}
    out.update({
        "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
        "accuracy": float(correct.mean()),
        "response_length_mean": float(lengths.mean()), "response_length_max": float(lengths.max()),
        "response_clipped_frac": float((host(ro.finish_reason) == 1).mean()),
    })
    for name, v in per_fn.items():
        out[f"reward/{name}"] = float(v.mean())
    return out


def throughput(ro: Rollout, seconds: float, model_cfg, passes: StepPasses, n: int, peak_tflops: float | None,
               devices: int) -> dict[str, float]:
    """Tokens per second, model TFLOP/s (the FLOPs of the ``passes`` the step ran over its ``n`` responses per
    prompt, :func:`jaxrl_llm.trainer.flops.rl_step_flops`) and, with a known peak, the model FLOPs utilisation of
    every device the run uses."""
    tokens = float(jnp.sum(ro.mask) + jnp.sum(ro.prompt_mask))
    prompt_lengths = host(ro.prompt_mask)[::n].sum(1)  # rows repeat each prompt n times
    response_lengths = host(ro.mask).sum(1).reshape(-1, n)
    flops = rl_step_flops(model_cfg, prompt_lengths, response_lengths, passes)["total"]
    out = {"tokens_per_sec": tokens / seconds, "model_tflops_per_sec": flops / seconds / 1e12}
    if peak_tflops is not None:
        out["mfu"] = out["model_tflops_per_sec"] / (peak_tflops * devices)
    return out
