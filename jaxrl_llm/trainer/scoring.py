"""The model passes over a step's rollouts that come before the update: the sampling policy's log-probs under the
trainer's numerics (old log-probs), the frozen reference policy's, the critic's values, the internal-layer policy of
BuPO's warm-up, and per-layer / routing diagnostics."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxrl_llm.distributed import host
from jaxrl_llm.parallel import Layout
from jaxrl_llm.trainer.rollout import route_axis
from jaxrl_llm.trainer.sharing import prompt_sharing
from jaxrl_llm.sampling import Rollout, layer_entropies, mismatch_metrics, routing_agreement, score
from jaxrl_llm.sampling.score import score_program

__all__ = ["Scores", "Scorer", "old_logp_source"]

# one program: op-by-op dispatch over a mesh puts many small independent collective programs in flight at once,
# which XLA:CPU's in-process collectives can deadlock on
_mismatch_metrics = jax.jit(mismatch_metrics, static_argnames="prefix")


@dataclasses.dataclass
class Scores:
    """What the scoring passes found (every array ``[N, R]``, 0 where the response mask is off)."""

    # the policy that sampled: the sampler's own log-probs in exact mode, else the trainer's forward; None: the
    # update's own forward gives them
    old_logp: jax.Array | None
    ref_logp: jax.Array | None = None  # the frozen reference policy (KL to it)
    values: jax.Array | None = None  # the critic's values
    bupo_old_logp: jax.Array | None = None  # the internal layer's policy during BuPO's warm-up
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


def old_logp_source(cfg) -> str:
    """Where a step's old log-probs (the ratio's denominator) come from:

    * ``"sampler"``: in ``exact`` consistency, the sampler's own; the update computes its log-probs with the
      sampler's decode step, so at the sampler's weights they are equal bit for bit and no pass is needed;
    * ``"update"``: the update's own forward (stop-gradient), for a single update on fresh rollouts (the policy
      before it is the one that sampled) when nothing needs them before the update (rollout correction, KL to a
      reference, Differential Smoothing, BuPO);
    * ``"score"``: a scoring pass of the trainer's forward."""
    a = cfg.algorithm
    if cfg.rollout.consistency == "exact":
        return "sampler"
    if (a.old_logp == "auto" and a.ppo_epochs * a.minibatches == 1 and a.rollout_is == "none"
            and a.rollout_mask == "none" and a.kl_coef == 0 and not (a.ds_gamma_pos or a.ds_gamma_neg)
            and not a.bupo_steps):
        return "update"
    return "score"


def _rows(ro: Rollout, start: int, stop: int) -> Rollout:
    return jax.tree.map(lambda x: x[:, start:stop] if route_axis(x) else x[start:stop], ro)


class Scorer:
    """Runs the scoring passes of a run config on the trainer's ``layout``: activations split by rows, each
    layer's weights gathered. Each pass runs over micro-batches of whole groups (``trainer.sharing.prompt_sharing``),
    never every rollout row in one forward.

    ``ref_state`` is the frozen reference policy (when the run has a KL term)."""

    def __init__(self, cfg, graphdef, sampler, layout: Layout, *, ref_state=None):
        self.cfg, self.graphdef, self.sampler, self.layout = cfg, graphdef, sampler, layout
        sharing = prompt_sharing(cfg)
        self.prompt_group, self.rows = sharing.score_group, sharing.score_rows
        self.ref_state = ref_state
        self.old_logp_source = old_logp_source(cfg)
        self.from_update = self.old_logp_source == "update"

    def _per_micro(self, fn, ro: Rollout):
        """``fn(micro-batch)`` over consecutive micro-batches of ``ro``'s rows (each placed over the row axes),
        the results concatenated along rows."""
        total = ro.tokens.shape[0]
        if total <= self.rows:
            return fn(ro)
        outs = [fn(self.layout.place_rows(_rows(ro, i, i + self.rows), route_axis))
                for i in range(0, total, self.rows)]
        return jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)

    def _score(self, state, ro: Rollout, *, group: int = 1, layer: int | None = None):
        """Log-probs of ``ro``'s tokens under ``state`` (replaying the sampler's MoE routing when the run does)."""
        r, t = self.cfg.rollout, self.cfg.train

        def one(part: Rollout):
            with self.layout.active():
                logp, _ = score(self.graphdef, state, part.prompt_ids, part.prompt_mask, part.tokens, part.mask,
                                temperature=r.temperature, chunk=t.logprob_chunk, group=group, layer=layer,
                                forced_experts=part.experts if r.routing_replay else None)
            return logp

        return self._per_micro(one, ro)

    def old_logp_program(self, state, ro: Rollout):
        """``(jitted function, args, kwargs)`` of the old-log-prob pass over a micro-batch ``ro`` (arrays may be
        abstract: the planner lowers it)."""
        cfg = self.cfg
        return score_program(self.graphdef, state, ro, temperature=cfg.rollout.temperature,
                             chunk=cfg.train.logprob_chunk, group=self.prompt_group,
                             forced_experts=ro.experts if cfg.rollout.routing_replay else None)

    def old_logp(self, state, ro: Rollout) -> jax.Array:
        """The sampling policy's log-probs under the trainer's forward."""

        def one(part: Rollout):
            fn, args, kwargs = self.old_logp_program(state, part)
            with self.layout.active():
                return fn(*args, **kwargs)[0]

        return self._per_micro(one, ro)

    def __call__(self, state, ro: Rollout, *, critic=None, bupo: bool = False) -> Scores:
        """The passes ``state`` (the policy that sampled ``ro``) needs this step; ``critic`` gives values,
        ``bupo`` scores the warm-up's internal layer."""
        scores = Scores(old_logp=ro.logprobs if self.old_logp_source == "sampler" else None)
        if self.old_logp_source == "score":
            scores.old_logp = self.old_logp(state, ro)
            scores.metrics.update(_mismatch_metrics(ro.logprobs, scores.old_logp, ro.mask, prefix="score_sampler"))
        scores.metrics.update(self.diagnostics(state, ro))
        if self.ref_state is not None:
            scores.ref_logp = self._score(self.ref_state, ro, group=self.prompt_group)
        if critic is not None:
            scores.values = self._per_micro(critic.values, ro)
        if bupo:  # the warm-up's ratio is between internal-layer policies
            scores.bupo_old_logp = self._score(state, ro, layer=self.cfg.algorithm.bupo_layer)
        return scores

    def diagnostics(self, state, ro: Rollout) -> dict[str, float]:
        """Per-layer read-out entropies (``log.layer_entropy``) and, for MoE models, how often the trainer's own
        routing agrees with the sampler's; micro-batch means weighted by their tokens."""
        out: dict[str, float] = {}
        g, cfg = self.graphdef, self.cfg

        def weighted(fn, weight):  # micro-batch means [..., k] -> the mean over every token
            parts = self._per_micro(lambda p: (fn(p)[None], jnp.asarray(weight(p), jnp.float32)[None]), ro)
            return host(jnp.tensordot(parts[1], parts[0], axes=1) / jnp.sum(parts[1]))

        if cfg.log.layer_entropy:
            ents = weighted(lambda p: layer_entropies(g, state, p.prompt_ids, p.prompt_mask, p.tokens, p.mask,
                                                      temperature=cfg.rollout.temperature,
                                                      chunk=cfg.train.logprob_chunk), lambda p: p.mask.sum())
            out.update({f"layer_entropy/{i}": float(e) for i, e in enumerate(ents)})
        if ro.experts is not None:
            out["routing_agreement"] = float(weighted(
                lambda p: routing_agreement(g, state, p.prompt_ids, p.prompt_mask, p.tokens, p.mask, p.experts),
                lambda p: p.prompt_mask.sum() + p.mask.sum()))
        return out

