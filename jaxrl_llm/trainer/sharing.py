"""How a step's rows share work: the ``n`` samples of a prompt run their prompt once, and the scoring passes and
updates run over micro-batches of whole groups. Plain Python (no JAX), so the memory planner's estimate uses it too.
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["PromptSharing", "prompt_sharing"]


class PromptSharing(NamedTuple):
    score_group: int  # rows per shared prompt in scoring passes (1 = one forward per row)
    update_group: int  # rows per shared prompt in updates
    pack: bool  # whether updates pack each group's responses
    score_rows: int  # rows per forward of the scoring passes (a micro-batch of whole groups)


def prompt_sharing(cfg) -> PromptSharing:
    """How a run config shares prompts (``train.share_prompts``, ``train.pack_responses``) and splits scoring.

    Updates share prompts only when a minibatch is the whole batch, so that micro-batches can hold whole groups
    without changing what an update sees, and a micro-batch holds whole groups. Scoring passes run a micro-batch of
    the update (``train.micro_batch_size`` rows) at a time, widened to whole groups when they share prompts."""
    t, n = cfg.train, cfg.rollout.n
    share = t.share_prompts and n > 1
    update = share and cfg.algorithm.minibatches == 1 and t.micro_batch_size % n == 0
    group, micro = (n if share else 1), t.micro_batch_size
    rows = micro if micro % group == 0 else group if group % micro == 0 else t.prompts_per_step * n
    pack = update and t.pack_responses
    return PromptSharing(group, n if update else 1, pack, rows)
