"""Rollouts: a step's prompts sampled ``n`` times each and scored by the reward functions.

:class:`RolloutEngine` is what the trainer sees (``update_weights``, ``generate``, ``close``); behind it a
:class:`RolloutWorker` samples one round of prompts and computes its rewards, in one of three arrangements:

* synchronous: every step samples from the weights of its own update;
* asynchronous (``rollout.async_rollout``): the next step's first round is sampled from the weights before this
  step's update, one step off-policy, and its host work (decoding, rewards) overlaps the update;
* disaggregated (``rollout.sampler_devices``): the sampler has devices of its own and receives the weights after
  every update; with async rollouts its whole collection runs in a background thread.

``rollout.sampler_lag`` (synchronous only) makes the sampler read the weights of that many steps before: a
controlled off-policy mismatch for experiments with the rollout corrections.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm import advantages as A
from jaxrl_llm.distributed import gather_blocks, host, owned_rows, rows_on_this_process, sum_blocks
from jaxrl_llm.parallel import Layout
from jaxrl_llm.rewards import compute_rewards
from jaxrl_llm.sampling import Rollout, SamplingParams
from jaxrl_llm.trainer.async_resume import ResumePoint

__all__ = ["RolloutBatch", "RolloutWorker", "RolloutEngine", "sampling_params", "trim_responses", "route_axis"]


def route_axis(x) -> int:
    """The row axis of a rollout leaf: MoE routes ``[L, N, T, k]`` hold rows on axis 1, everything else on 0."""
    return 1 if getattr(x, "ndim", 0) == 4 else 0


@dataclasses.dataclass
class RolloutBatch:
    """One step's rollouts and their rewards (rows prompt-major, ``n`` consecutive rows per prompt)."""

    rollout: Rollout
    rewards: np.ndarray  # float32 [N]: weighted sum of the reward functions
    per_fn: dict[str, np.ndarray]  # each reward function's scores [N]
    stats: dict[str, float]  # reward failures, prompts read, sampling rounds, dynamic-sampling fill, staleness

    @property
    def correct(self) -> np.ndarray:
        """Whether each response solved its prompt: the first reward function's score is positive."""
        return next(iter(self.per_fn.values())) > 0


def sampling_params(cfg, tokenizer) -> SamplingParams:
    """The sampling settings of a run config (``TrainConfig``): its rollout section, stopping at the tokenizer's
    end-of-text and chat end-of-turn tokens."""
    r = cfg.rollout
    stops = tuple(i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))
                  if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id)
    return SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, min_p=r.min_p,
                          max_new_tokens=r.max_new_tokens, n=r.n, stop_tokens=stops)


def trim_responses(ro: Rollout, multiple: int = 16) -> Rollout:
    """Cut the response axis to the longest response, rounded up to ``multiple`` (few distinct shapes, so few
    compilations): scoring and updates then pay for the tokens sampled rather than the whole budget. Causal
    attention makes the cut invisible to the kept tokens."""
    r = ro.tokens.shape[1]
    longest = int(np.max(host(ro.lengths))) if ro.lengths.size else 0
    keep = min(r, max(multiple, -(-longest // multiple) * multiple))
    if keep == r:
        return ro
    p = ro.prompt_ids.shape[1]
    experts = None if ro.experts is None else ro.experts[:, :, :p + keep]
    return ro.replace(tokens=ro.tokens[:, :keep], logprobs=ro.logprobs[:, :keep], mask=ro.mask[:, :keep],
                      experts=experts)


def _concat(parts: list[Rollout]) -> Rollout:
    if len(parts) == 1:
        return parts[0]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=route_axis(xs[0])), *parts)


def _take_rows(ro: Rollout, idx: np.ndarray) -> Rollout:
    return jax.tree.map(lambda x: x[:, idx] if route_axis(x) else x[idx], ro)


class RolloutWorker:
    """Samples rounds of prompts with ``sampler`` on ``layout`` (the trainer's devices, or the sampler's own) and
    scores them. Owns the prompt stream and the sampling PRNG key, which together say where a run is."""

    def __init__(self, cfg, sampler, params: SamplingParams, encoder, tokenizer, stream, reward_fns, layout: Layout,
                 train_layout: Layout, key, first_errors: dict | None = None):
        self.cfg, self.sampler, self.params, self.tokenizer = cfg, sampler, params, tokenizer
        self.encoder = encoder  # prompt rows to left-padded token ids (chat template, truncation)
        self.stream, self.reward_fns, self.layout, self.train_layout = stream, reward_fns, layout, train_layout
        self.key = key
        self.first_errors = first_errors  # each reward function's first failure, by name (guard.py stops on them)

    def sample(self, state) -> dict:
        """Device part of one round: a global batch of prompts sampled ``n`` times. Each process reads only the
        prompts its sampling devices hold and those of the rollout rows whose rewards it computes (its block)."""
        n, b = self.cfg.rollout.n, self.cfg.train.prompts_per_step
        owned = owned_rows(b * n)
        sharding = self.layout.rows(b)  # prompts split over the data-parallel devices: each samples its share
        positions = np.union1d(rows_on_this_process(sharding, b), owned // n)
        rows = dict(zip(positions.tolist(), self.stream.next_batch(positions)))
        local_ids, local_mask = self.encoder.encode([rows[i] for i in positions])
        ids = np.zeros((b,) + local_ids.shape[1:], local_ids.dtype)
        mask = np.zeros((b,) + local_mask.shape[1:], bool)
        ids[positions], mask[positions] = local_ids, local_mask  # rows held elsewhere stay unread
        self.key, sub = jax.random.split(self.key)
        # global arrays from the rows this process read (each device takes its own rows)
        ids, mask = (jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index]) for x in (ids, mask))
        with self.layout.active():  # traced on the mesh: rows stay split, weights are gathered layer by layer
            ro = self.sampler.generate(state, ids, mask, self.params, sub)
        if self.layout is not self.train_layout:  # back to the trainer's devices
            ro = self.train_layout.place_rows(ro, route_axis)
        return dict(ro=ro, rows=rows, owned=owned, positions=positions, tokens=host(ro.tokens),
                    lengths=host(ro.lengths))

    def finish(self, sample: dict) -> RolloutBatch:
        """Host part of one round (no device calls): decoding and the rewards of this process's rows."""
        n = self.cfg.rollout.n
        owned, rows, tokens, lengths = (sample[k] for k in ("owned", "rows", "tokens", "lengths"))
        completions = self.tokenizer.batch_decode([tokens[r, :lengths[r]] for r in owned], skip_special_tokens=True)
        mine = [rows[r // n] for r in owned]
        columns = {k: [row.get(k) for row in mine] for k in mine[0] if k != "prompt"}
        rewards, per_fn, stats = compute_rewards(self.reward_fns, [row["prompt"] for row in mine], completions,
                                                 columns, timeout=self.cfg.reward.timeout,
                                                 workers=self.cfg.reward.workers, first_errors=self.first_errors)
        total = len(tokens)
        rewards = gather_blocks(rewards, total)
        per_fn = {k: gather_blocks(v, total) for k, v in per_fn.items()}
        stats = dict(sum_blocks(stats, len(owned), total), prompts_read=len(sample["positions"]))
        return RolloutBatch(sample["ro"], rewards, per_fn, stats)

    def collect(self, state, first=None) -> RolloutBatch:
        """A step's rollouts; with dynamic sampling, rounds are added until enough groups are informative (their
        rewards differ) and the informative groups are kept first. ``first`` (a future) holds a first round
        already sampled from ``state``."""
        a, n, g = self.cfg.algorithm, self.cfg.rollout.n, self.cfg.train.prompts_per_step
        parts: list[RolloutBatch] = []
        while True:
            parts.append(first.result() if first is not None and not parts else self.finish(self.sample(state)))
            if not a.dynamic_sampling:
                break
            informative = sum(int(np.asarray(A.informative_groups(p.rewards.reshape(-1, n))).sum()) for p in parts)
            if informative >= g or len(parts) >= a.max_sampling_tries:
                break
        batch = RolloutBatch(_concat([p.rollout for p in parts]), np.concatenate([p.rewards for p in parts]),
                             {k: np.concatenate([p.per_fn[k] for p in parts]) for k in parts[0].per_fn},
                             {k: sum(p.stats[k] for p in parts) for k in parts[0].stats})
        batch.stats["sampling_tries"] = float(len(parts))
        if a.dynamic_sampling:
            batch = _keep_informative(batch, n, g)
        return batch


def _keep_informative(batch: RolloutBatch, n: int, groups: int) -> RolloutBatch:
    """The first ``groups`` groups, informative ones (rewards not all equal) first (DAPO's dynamic sampling)."""
    info = np.asarray(A.informative_groups(batch.rewards.reshape(-1, n)))
    order = np.concatenate([np.flatnonzero(info), np.flatnonzero(~info)])[:groups]
    rows = (order[:, None] * n + np.arange(n)[None]).reshape(-1)
    stats = dict(batch.stats, dynamic_fill_rate=float(min(info.sum(), groups) / groups))
    return RolloutBatch(_take_rows(batch.rollout, rows), batch.rewards[rows],
                        {k: v[rows] for k, v in batch.per_fn.items()}, stats)


class RolloutEngine:
    """The trainer's source of rollouts: ``update_weights`` after every update, ``generate`` once per step.

    ``sampler_layout`` (disaggregated mode) is the sampler's own devices; ``asynchronous`` samples the next step's
    rollouts from the weights before the current update; ``lag`` (synchronous) samples from the weights given
    ``lag`` calls of ``update_weights`` before."""

    def __init__(self, worker: RolloutWorker, *, asynchronous: bool, sampler_layout: Layout | None = None,
                 lag: int = 0):
        if lag and (asynchronous or sampler_layout is not None):
            raise ValueError("a lagging sampler is synchronous on the trainer's devices")
        self.worker = worker
        self.sampler_layout = sampler_layout
        self._executor = ThreadPoolExecutor(max_workers=1) if asynchronous else None
        self._pending = None  # the next step's rollouts, in the making
        self._weights = None
        self._history = deque(maxlen=lag + 1) if lag else None  # the last lag + 1 weights given, oldest first
        # async: where the rollouts in the making started (data position, key, weights), for exact resume
        self.resume_point: ResumePoint | None = None

    def _placed(self, state):
        """``state`` as the sampler reads it: on the sampler's devices in disaggregated mode, a copy in async mode
        or with a lag (weights kept past the next update, which donates the live buffers)."""
        if self.sampler_layout is not None:
            return jax.device_put(state, self.sampler_layout.replicated())
        if self._executor is not None or self._history is not None:
            return jax.tree.map(jnp.copy, state)
        return state

    def update_weights(self, state) -> None:
        """The policy the next rollouts sample from (with a lag: the oldest of the last ``lag + 1`` given)."""
        self._weights = self._placed(state)
        if self._history is not None:
            self._history.append(self._weights)
            self._weights = self._history[0]

    def resume(self, sampler_state) -> None:
        """Continue an async run from a checkpoint saved while rollouts were in the making: they are sampled again
        from ``sampler_state`` (the weights they were drawn from), from the restored data position and key."""
        state = self._placed(sampler_state)
        self.resume_point = ResumePoint.of(self.worker.stream, self.worker.key, state)
        self._pending = (self._executor.submit(self.worker.collect, state) if self.sampler_layout is not None
                         else (state, None))

    def generate(self) -> RolloutBatch:
        """This step's rollouts. Async mode samples the next step's from the current weights (one step
        off-policy); the first step (and the first after a resume) samples synchronously.

        With its own sampler devices the whole collection runs in a background thread while this step trains.
        On the trainer's own devices every device call stays on this thread (two threads' multi-device programs
        in flight at once can deadlock XLA's collectives): the next step's first round is sampled here, before
        this step's update, and only its host work (decoding, rewards) overlaps the update."""
        worker, weights = self.worker, self._weights
        if self._executor is None:
            batch = worker.collect(weights)
            if self._history is not None:
                batch.stats["rollout_staleness"] = float(len(self._history) - 1)
            return batch
        stale = self._pending is not None
        if self.sampler_layout is not None:
            if not stale:
                self._pending = self._executor.submit(worker.collect, weights)
            batch = self._pending.result()
            self.resume_point = ResumePoint.of(worker.stream, worker.key, weights)
            self._pending = self._executor.submit(worker.collect, weights)
        else:
            state, first = self._pending if stale else (weights, None)
            batch = worker.collect(state, first)
            self.resume_point = ResumePoint.of(worker.stream, worker.key, weights)
            self._pending = (weights, self._executor.submit(worker.finish, worker.sample(weights)))
        batch.stats["rollout_staleness"] = float(stale)  # updates between the weights that sampled and trained
        return batch

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)  # lets an in-flight rollout finish; its result is dropped
            self._pending = None
