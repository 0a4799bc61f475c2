"""The policy being trained and its updates: ``ppo_epochs`` x ``minibatches`` optimizer updates per step, each a
jitted step over micro-batches (:mod:`jaxrl_llm.trainer.step`), packed and sharded as the run config says."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_llm.distributed import host
from jaxrl_llm.losses import exploration as X
from jaxrl_llm.parallel import Layout, active_row_ways, constrain_rows
from jaxrl_llm.sampling import sequence_logprobs, teacher_forced_logprobs, values_with_gradient
from jaxrl_llm.trainer.critic import Critic
from jaxrl_llm.trainer.experience import CriticTargets
from jaxrl_llm.trainer.optim import init_opt_state, run_optimizer
from jaxrl_llm.trainer.packing import packed_rows_multiple, plan_packing
from jaxrl_llm.trainer.sharing import prompt_sharing
from jaxrl_llm.trainer.step import Experience, jit_update_step, minibatch_normalizer, split_micro

__all__ = ["Learner", "policy_logprob_fn", "exact_decode_pass", "build_update", "micro_shardings"]


def policy_logprob_fn(cfg, group: int, layer: int | None = None):
    """``logprob_fn(model, experience)`` of the update: the current policy's log-probs and entropies of the
    experience's tokens at the rollout temperature, each prompt run once for its ``group`` rows (packed when the
    experience carries a packing plan); ``layer`` reads out an internal layer's policy (BuPO).

    In ``exact`` consistency their values are the experience's ``decoded`` ones (:func:`exact_decode_pass`) and
    their gradient that of this full-sequence forward (``sampling.values_with_gradient``)."""
    temperature, chunk = cfg.rollout.temperature, cfg.train.logprob_chunk

    def logprob_fn(model, exp: Experience):
        return sequence_logprobs(model, exp.prompt_ids, exp.prompt_mask, exp.tokens, exp.mask,
                                 temperature=temperature, chunk=chunk, forced_experts=exp.forced_experts,
                                 layer=layer, group=group if layer is None else 1, packing=exp.packing)

    if cfg.rollout.consistency != "exact" or layer is not None:
        return logprob_fn

    def exact_logprob_fn(model, exp: Experience):
        if exp.decoded is None:
            raise ValueError("exact consistency's log-probs take their values from the update step's decode pass: "
                             "build the step with decode_pass=exact_decode_pass(cfg, sampler)")
        graphdef, state = nnx.split(model)

        def full_forward(state, exp):
            return logprob_fn(nnx.merge(graphdef, state), exp)

        return values_with_gradient(exp.decoded, full_forward, state, exp.replace(decoded=None))

    return exact_logprob_fn


def exact_decode_pass(cfg, sampler):
    """``decode_pass(model, micro_batches)`` of ``exact`` consistency's update step: the log-probs and entropies of
    all micro-batches' tokens from the sampler's own prefill and decode step, run over the rows together, in the
    order, sharding and batch size the sampler generated them in (``sampling.teacher_forced_logprobs``: at the
    sampler's weights, the sampler's log-probs bit for bit), stored as the micro-batches' ``decoded``."""

    def decode_pass(model, micro: Experience) -> Experience:
        num_micro, rows = micro.mask.shape[:2]
        whole = [constrain_rows(x.reshape(num_micro * rows, *x.shape[2:]))
                 for x in (micro.prompt_ids, micro.prompt_mask, micro.tokens, micro.mask, micro.lengths)]
        ways = active_row_ways()  # the sampler's shards: its rows split over the mesh's row axes
        decoded = teacher_forced_logprobs(sampler.graphdef, nnx.state(model), *whole, n=cfg.rollout.n,
                                          temperature=cfg.rollout.temperature, cache_dtype=sampler.cache_dtype,
                                          compute_dtype=sampler.compute_dtype, compact_rows=sampler.compact_rows,
                                          shards=ways if (num_micro * rows) % ways == 0 else 1)
        return micro.replace(decoded=tuple(x.reshape(num_micro, rows, -1) for x in decoded))

    return decode_pass


def build_update(cfg, graphdef, optimizer, params, rest, opt_state, *, layer: int | None = None, sampler=None):
    """The jitted update step of a run config for parameters, state and optimizer state placed as given (the
    program the trainer runs, and the one the planner compiles); ``layer`` trains an internal layer's policy;
    ``sampler`` is the run's sampler (``exact`` consistency's values come from its decode step)."""
    shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    decode_pass = None
    if cfg.rollout.consistency == "exact" and layer is None:
        if sampler is None:
            raise ValueError("exact consistency's update runs the sampler's decode step: pass the sampler")
        decode_pass = exact_decode_pass(cfg, sampler)
    # Dr. GRPO's constant normaliser is the generation budget unless set: responses are trimmed to the longest
    # sampled one, so the padded length would change from step to step
    logprob_fn = policy_logprob_fn(cfg, prompt_sharing(cfg).update_group, layer)
    return jit_update_step(graphdef, optimizer, cfg.algorithm, logprob_fn, shardings(params), shardings(rest),
                           shardings(opt_state),
                           agg_constant=cfg.algorithm.agg_constant or float(cfg.rollout.max_new_tokens),
                           decode_pass=decode_pass)


def micro_shardings(layout: Layout, micro: Experience):
    """Where the update's micro-batches ``[num_micro, rows, ...]`` live: split over rows (MoE routes
    ``[num_micro, L, rows, ...]`` on their axis 2)."""
    return jax.tree.map(lambda x: layout.rows(axis=2 if x.ndim == 5 else 1), micro)


def _take(exp: Experience, idx) -> Experience:
    routes = exp.forced_experts  # [L_moe, N, T, k]: rows are on axis 1
    part = jax.tree.map(lambda x: x[idx], exp.replace(forced_experts=None))
    return part if routes is None else part.replace(forced_experts=routes[:, idx])


class Learner:
    """The trained policy (parameters, optimizer state, the jitted update) of a run config on ``layout``, and the
    critic when the run has one (``critic_trunk``: a fresh copy of the policy model). ``sampler`` is the run's
    sampler: ``exact`` consistency's update runs its decode step."""

    def __init__(self, cfg, model, layout: Layout, *, critic_trunk=None, sampler=None):
        a, t = cfg.algorithm, cfg.train
        self.cfg, self.layout, self.sampler = cfg, layout, sampler
        self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
        self.optimizer = run_optimizer(cfg)
        self.opt_state = init_opt_state(self.optimizer, self.params, layout.replicated())
        # rows come in groups of n samples of one prompt, run once per group where possible (packing.py)
        self.sharing = prompt_sharing(cfg)
        self.pack_rows = packed_rows_multiple(layout.row_ways, t.micro_batch_size)
        self.entropy_coef = float(a.entropy_coef)
        self._update = self._jit_update(None)
        # BuPO warm-up: the same update on the policy read out after layer bupo_layer (only layers <= l and the
        # unembedding receive gradient)
        self._update_bupo = self._jit_update(a.bupo_layer) if a.bupo_steps else None
        self.critic = None
        if critic_trunk is not None:
            self.critic = Critic(critic_trunk, run_optimizer(cfg, a.critic_lr or t.lr), layout,
                                 value_clip=a.value_clip)

    def _jit_update(self, layer):
        return build_update(self.cfg, self.graphdef, self.optimizer, self.params, self.rest, self.opt_state,
                            layer=layer, sampler=self.sampler)

    def policy_state(self):
        return nnx.merge_state(self.params, self.rest)

    def model(self):
        return nnx.merge(self.graphdef, self.params, self.rest)

    def in_bupo_warmup(self, step: int) -> bool:
        return self._update_bupo is not None and step < self.cfg.algorithm.bupo_steps

    def update(self, exp: Experience, targets: CriticTargets | None, step: int) -> dict[str, float]:
        """``ppo_epochs`` x ``minibatches`` updates on a step's experience (the BuPO warm-up's internal-layer update
        during its steps, which reads out a layer and so neither shares prompts nor packs); the metrics averaged
        over the updates (``skipped_nonfinite`` summed). ``train_sampler_*`` are the first update's, whose
        differentiated log-probs come from the policy that sampled (in sync runs); the drift from the sampler is
        ``offpolicy_kl``, kept per update."""
        a = self.cfg.algorithm
        sums: dict[str, float] = {}
        per_update: dict[str, float] = {}
        first: dict[str, float] = {}
        for j, (idx, part) in enumerate(self._minibatches(exp, step)):
            m = self._update_minibatch(part, step, j, bupo=self.in_bupo_warmup(step))
            gap = {k: float(m.pop(k)) for k in list(m) if k.startswith("train_sampler_")}
            if gap:
                first = first or gap
                per_update[f"offpolicy_kl/update{j}"] = gap["train_sampler_kl"]
                m["offpolicy_kl"] = gap["train_sampler_kl"]
            if targets is not None:
                m = dict(m, **self._update_critic(exp, targets, idx))
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        count = a.ppo_epochs * a.minibatches
        out = {k: v / count for k, v in sums.items()}
        out["skipped_nonfinite"] = sums.get("skipped_nonfinite", 0.0)
        out.update(first)
        if len(per_update) > 1:
            out.update(per_update)
        if a.entropy_target is not None:
            self.entropy_coef = float(X.adaptive_entropy_coef(
                self.entropy_coef, out["entropy"], target=a.entropy_target, step=a.entropy_coef_step,
                max_coef=a.entropy_coef_max))
        return out

    def _minibatches(self, exp: Experience, step: int):
        """``(row indices, experience)`` of every minibatch of every epoch; whole groups are shuffled when updates
        share prompts, so every micro-batch holds whole groups. In ``exact`` consistency a minibatch is the whole
        batch as sampled with the other minibatches' responses masked out: the update runs the sampler's decode
        step, whose rows round as the sampler's only in a batch like the sampler's."""
        a, g = self.cfg.algorithm, self.sharing.update_group
        rows = exp.num_rows
        mb = rows // a.minibatches
        exact = self.cfg.rollout.consistency == "exact"
        for epoch in range(a.ppo_epochs):
            groups = np.random.default_rng((self.cfg.train.seed, step, epoch)).permutation(rows // g)
            perm = (groups[:, None] * g + np.arange(g)).reshape(-1)
            for i in range(a.minibatches):
                idx = jnp.asarray(perm[i * mb:(i + 1) * mb])
                if exact:
                    keep = np.zeros((rows, 1), bool)
                    keep[perm[i * mb:(i + 1) * mb]] = True
                    yield idx, exp.replace(mask=exp.mask & jnp.asarray(keep))
                else:
                    yield idx, _take(exp, idx)

    def _update_minibatch(self, part: Experience, step: int, j: int, *, bupo: bool) -> dict:
        cfg = self.cfg
        num_micro = part.num_rows // cfg.train.micro_batch_size
        if self.sharing.pack and not bupo:
            part = part.replace(packing=plan_packing(host(part.mask), group=self.sharing.update_group,
                                                     num_micro=num_micro, row_multiple=self.pack_rows))
        norm = minibatch_normalizer(part.mask, cfg.algorithm)
        micro = self._place_micro(split_micro(part, num_micro))
        control = {"entropy_coef": jnp.float32(self.entropy_coef),
                   "key": jax.random.fold_in(jax.random.key(cfg.train.seed), step * 4096 + j)}
        update = self._update_bupo if bupo else self._update
        with self.layout.active():
            self.params, self.opt_state, m = update(self.params, self.rest, self.opt_state, micro, norm, control)
        return m

    def _place_micro(self, micro: Experience) -> Experience:
        """Micro-batches ``[num_micro, rows, ...]`` sharded over rows (MoE routes ``[num_micro, L, rows, ...]``)."""
        return jax.device_put(micro, micro_shardings(self.layout, micro))

    def _update_critic(self, exp: Experience, targets: CriticTargets, idx) -> dict:
        batch = {"prompt_ids": exp.prompt_ids, "prompt_mask": exp.prompt_mask, "tokens": exp.tokens,
                 "mask": exp.mask, "old_values": targets.old_values, "returns": targets.returns}
        num_micro = len(idx) // self.cfg.train.micro_batch_size
        return self.critic.update({k: v[idx] for k, v in batch.items()}, num_micro)

    def state(self) -> dict:
        """The learner's part of a checkpoint."""
        out = {"params": self.params, "opt_state": self.opt_state}
        if self.critic is not None:
            out["critic"] = self.critic.state()
        return out

    def load_state(self, state: dict) -> None:
        self.params, self.opt_state = state["params"], state["opt_state"]
        if self.critic is not None:
            self.critic.load_state(state["critic"])
