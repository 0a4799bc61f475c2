"""Evaluation during training: held-out prompts sampled ``eval.n`` times and scored by the run's reward functions.

The training loop calls :meth:`Evaluator.maybe_run` after every step; on the steps ``eval.every`` divides (and the
last one, and step 0 with ``eval.at_start``) it returns ``eval/...`` metrics:

* ``eval/pass@k`` for k in {1, 2, 4, 8, 16, n} up to n: the unbiased estimator ``1 - C(n - c, k) / C(n, k)`` per
  prompt (``c`` of its ``n`` samples correct, i.e. with a positive score from the first reward function, as in
  the training metrics), averaged over the prompts;
* ``eval/reward_mean`` (the weighted reward), ``eval/reward/<name>`` per reward function, ``eval/accuracy`` (the
  fraction of correct samples), ``eval/response_length_mean``, ``eval/prompts``, ``eval/time``.

Its randomness is ``fold_in(key(eval.seed), step)``: evaluating changes nothing in the training run, and a
resumed run evaluates as the uninterrupted one did. Sampling runs on the trainer's mesh with the trainer's
current weights, each process reading only the prompts its devices hold and scoring its block of rows.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from jaxrl_llm.data import PromptEncoder, prepare_prompts
from jaxrl_llm.distributed import gather_blocks, host, owned_rows, rows_on_this_process
from jaxrl_llm.metrics import mean_pass_at_k
from jaxrl_llm.parallel import Layout
from jaxrl_llm.rewards import compute_rewards

__all__ = ["Evaluator", "eval_ks"]


def eval_ks(n: int) -> list[int]:
    return sorted({1, n} | {k for k in (2, 4, 8, 16) if k <= n})


class Evaluator:
    """Held-out evaluation of a policy. ``rows``: random-access prompt rows; ``encoder`` renders them."""

    def __init__(self, rows, encoder: PromptEncoder, *, sampler, sampling, reward_fns, layout: Layout, tokenizer,
                 every: int, at_start: bool, last_step: int, batch_prompts: int, max_prompts: int | None,
                 seed: int, reward_timeout: float):
        self.rows, self.encoder, self.sampler, self.sampling = rows, encoder, sampler, sampling
        self.reward_fns, self.layout, self.tokenizer = reward_fns, layout, tokenizer
        self.every, self.at_start, self.last_step = every, at_start, last_step
        self.batch_prompts = batch_prompts
        self.count = len(rows) if max_prompts is None else min(max_prompts, len(rows))
        self.seed, self.reward_timeout = seed, reward_timeout

    @classmethod
    def for_run(cls, cfg, *, tokenizer, sampler, sampling, reward_fns, layout: Layout, holdout=None,
                encoder: PromptEncoder | None = None) -> "Evaluator | None":
        """The evaluator a run config asks for (None without evaluation): ``eval.data`` is read and validated
        here; ``eval.split`` rows come as ``holdout`` with the training data's ``encoder``."""
        e = cfg.eval
        if not (e.every or e.at_start):
            return None
        if cfg.rollout.async_rollout and jax.process_count() > 1:
            # the rewards of the next step's rollouts are then gathered across processes in a background thread,
            # while evaluation gathers its own on the main thread: the two orders could differ between processes
            raise ValueError("eval.every: evaluation during training with rollout.async_rollout is single-process "
                             "for now; evaluate the exported checkpoint, or set rollout.async_rollout=false")
        if e.data.source != "none":
            holdout, encoder, _ = prepare_prompts(e.data, tokenizer, key="eval.data", split="eval")
        params = dataclasses.replace(sampling, n=e.n, temperature=e.temperature or sampling.temperature,
                                     max_new_tokens=e.max_new_tokens or sampling.max_new_tokens)
        return cls(holdout, encoder, sampler=sampler, sampling=params, reward_fns=reward_fns, layout=layout,
                   tokenizer=tokenizer, every=e.every, at_start=e.at_start, last_step=cfg.train.steps,
                   batch_prompts=e.batch_prompts, max_prompts=e.max_prompts, seed=e.seed,
                   reward_timeout=cfg.reward.timeout)

    def due(self, step: int) -> bool:
        if step == 0:
            return self.at_start
        return bool(self.every) and (step % self.every == 0 or step == self.last_step)

    def maybe_run(self, step: int, state) -> dict[str, float]:
        """The ``eval/...`` metrics of the policy ``state`` (an nnx state) when ``step`` is due, else ``{}``."""
        return self.run(step, state) if self.due(step) else {}

    def run(self, step: int, state) -> dict[str, float]:
        t0 = time.perf_counter()
        key = jax.random.fold_in(jax.random.key(self.seed), step)
        correct, rewards, per_fn, lengths = [], [], {}, []
        for start in range(0, self.count, self.batch_prompts):
            key, sub = jax.random.split(key)
            keep = min(self.batch_prompts, self.count - start)
            out = self._batch(state, start, sub)
            n = self.sampling.n
            rows = keep * n  # the last batch is padded with copies of its last prompt; those rows are dropped
            correct.append(out["correct"][:rows].reshape(keep, n))
            rewards.append(out["rewards"][:rows])
            lengths.append(out["lengths"][:rows])
            for name, v in out["per_fn"].items():
                per_fn.setdefault(name, []).append(v[:rows])
        hits = np.concatenate(correct)
        metrics = {f"eval/pass@{k}": v for k, v in mean_pass_at_k(hits, eval_ks(self.sampling.n)).items()}
        metrics.update({"eval/reward_mean": float(np.concatenate(rewards).mean()),
                        "eval/accuracy": float(hits.mean()),
                        "eval/response_length_mean": float(np.concatenate(lengths).mean()),
                        "eval/prompts": float(self.count)})
        metrics.update({f"eval/reward/{name}": float(np.concatenate(v).mean()) for name, v in per_fn.items()})
        metrics["eval/time"] = time.perf_counter() - t0
        return metrics

    def _batch(self, state, start: int, key) -> dict:
        """Sample and score prompts ``start ... start + batch_prompts - 1`` (indices past the end repeat the last)."""
        b, n = self.batch_prompts, self.sampling.n
        sharding = self.layout.rows(b)  # prompts split over the data-parallel devices when they divide
        owned = owned_rows(b * n)
        positions = np.union1d(rows_on_this_process(sharding, b), owned // n)
        rows = {int(i): self.rows[min(start + int(i), self.count - 1)] for i in positions}
        local_ids, local_mask = self.encoder.encode([rows[int(i)] for i in positions])
        ids = np.zeros((b,) + local_ids.shape[1:], local_ids.dtype)
        mask = np.zeros((b,) + local_mask.shape[1:], bool)
        ids[positions], mask[positions] = local_ids, local_mask
        ids, mask = (jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index]) for x in (ids, mask))
        with self.layout.active():  # traced on the mesh, as the rollout worker samples
            ro = self.sampler.generate(state, ids, mask, self.sampling, key)
        tokens, lengths = host(ro.tokens), host(ro.lengths)
        texts = self.tokenizer.batch_decode([tokens[r, :lengths[r]] for r in owned], skip_special_tokens=True)
        mine = [rows[int(r) // n] for r in owned]
        columns = {k: [row.get(k) for row in mine] for k in mine[0] if k != "prompt"}
        rewards, per_fn, _ = compute_rewards(self.reward_fns, [row["prompt"] for row in mine], texts, columns,
                                             timeout=self.reward_timeout)
        total = b * n
        first = next(iter(per_fn.values()))
        return {"rewards": gather_blocks(rewards, total), "lengths": lengths,
                "per_fn": {k: gather_blocks(v, total) for k, v in per_fn.items()},
                "correct": gather_blocks(first, total) > 0}
