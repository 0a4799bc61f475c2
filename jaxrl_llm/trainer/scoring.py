"""The model passes over a step's rollouts that come before the update: the sampling policy's log-probs under the
trainer's numerics (old log-probs), the frozen reference policy's, the critic's values, the internal-layer policy of
BuPO's warm-up, and per-layer / routing diagnostics."""
from __future__ import annotations

import dataclasses

import jax

from jaxrl_llm.distributed import host
from jaxrl_llm.parallel import Layout
from jaxrl_llm.sampling import (Rollout, layer_entropies, mismatch_metrics, rollout_logprobs_program, routing_agreement,
                                score)

__all__ = ["Scores", "Scorer", "old_logp_from_update"]

# one program: op-by-op dispatch over a mesh puts many small independent collective programs in flight at once,
# which XLA:CPU's in-process collectives can deadlock on
_mismatch_metrics = jax.jit(mismatch_metrics)


@dataclasses.dataclass
class Scores:
    """What the scoring passes found (every array ``[N, R]``, 0 where the response mask is off)."""

    old_logp: jax.Array | None  # the policy that sampled, trainer numerics; None: the update's own forward gives it
    ref_logp: jax.Array | None = None  # the frozen reference policy (KL to it)
    values: jax.Array | None = None  # the critic's values
    bupo_old_logp: jax.Array | None = None  # the internal layer's policy during BuPO's warm-up
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


def old_logp_from_update(cfg) -> bool:
    """Whether old log-probs come from the update's own forward instead of a scoring pass: only for a single
    update on fresh rollouts (the policy before it is the one that scores), when nothing needs them before
    the update (rollout correction, KL to a reference, Differential Smoothing, BuPO) and the sampler is not
    in exact mode (whose scoring pass replays the sampler's computation bit for bit)."""
    a = cfg.algorithm
    return (a.old_logp == "auto" and a.ppo_epochs * a.minibatches == 1 and a.rollout_is == "none"
            and a.rollout_mask == "none" and a.kl_coef == 0 and not (a.ds_gamma_pos or a.ds_gamma_neg)
            and not a.bupo_steps and cfg.rollout.consistency != "exact")


class Scorer:
    """Runs the scoring passes of a run config on the trainer's ``layout``: activations split by rows, each
    layer's weights gathered (not for the sampler's exact replay, which runs the sampler's own program).

    ``ref_state`` is the frozen reference policy (when the run has a KL term), ``prompt_group`` the rows that share
    a prompt in scoring passes (each prompt is then run once)."""

    def __init__(self, cfg, graphdef, sampler, layout: Layout, *, prompt_group: int, ref_state=None):
        self.cfg, self.graphdef, self.sampler, self.layout = cfg, graphdef, sampler, layout
        self.prompt_group = prompt_group
        self.ref_state = ref_state
        self.from_update = old_logp_from_update(cfg)

    def _score(self, state, ro: Rollout, **kwargs):
        r, t = self.cfg.rollout, self.cfg.train
        with self.layout.active():
            logp, _ = score(self.graphdef, state, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask,
                            temperature=r.temperature, chunk=t.logprob_chunk, **kwargs)
        return logp

    def old_logp_program(self, state, ro: Rollout):
        """``(jitted function, args, kwargs)`` of the old-log-prob pass over ``ro`` (arrays may be abstract: the
        planner lowers it)."""
        cfg = self.cfg
        return rollout_logprobs_program(self.sampler, self.graphdef, state, ro, temperature=cfg.rollout.temperature,
                                        chunk=cfg.train.logprob_chunk, group=self.prompt_group,
                                        forced_experts=ro.experts if cfg.rollout.routing_replay else None)

    def __call__(self, state, ro: Rollout, *, critic=None, bupo: bool = False) -> Scores:
        """The passes ``state`` (the policy that sampled ``ro``) needs this step; ``critic`` gives values,
        ``bupo`` scores the warm-up's internal layer."""
        cfg = self.cfg
        replay = ro.experts if cfg.rollout.routing_replay else None
        scores = Scores(old_logp=None)
        if not self.from_update:
            fn, args, kwargs = self.old_logp_program(state, ro)
            with self.layout.active():
                scores.old_logp, _ = fn(*args, **kwargs)
            scores.metrics.update(_mismatch_metrics(ro.logprobs, scores.old_logp, ro.mask))
        scores.metrics.update(self.diagnostics(state, ro))
        if self.ref_state is not None:
            scores.ref_logp = self._score(self.ref_state, ro, group=self.prompt_group)
        if critic is not None:
            scores.values = critic.values(ro)
        if bupo:  # the warm-up's ratio is between internal-layer policies
            scores.bupo_old_logp = self._score(state, ro, forced_experts=replay, layer=cfg.algorithm.bupo_layer)
        return scores

    def diagnostics(self, state, ro: Rollout) -> dict[str, float]:
        """Per-layer read-out entropies (``log.layer_entropy``) and, for MoE models, how often the trainer's own
        routing agrees with the sampler's."""
        out: dict[str, float] = {}
        if self.cfg.log.layer_entropy:
            ents = layer_entropies(self.graphdef, state, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask,
                                   temperature=self.cfg.rollout.temperature, chunk=self.cfg.train.logprob_chunk)
            out.update({f"layer_entropy/{i}": float(e) for i, e in enumerate(host(ents))})
        if ro.experts is not None:
            out["routing_agreement"] = float(routing_agreement(self.graphdef, state, ro.prompt_ids, ro.prompt_mask,
                                                               ro.tokens, ro.mask, ro.experts))
        return out

