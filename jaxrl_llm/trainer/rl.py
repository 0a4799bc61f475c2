"""The RL loop. One step is a short sequence of owners:

    rollouts   = RolloutEngine.generate()       trainer/rollout.py   sampling + rewards (sync, async, disaggregated)
    scores     = Scorer(state, rollouts)         trainer/scoring.py   old / reference log-probs, critic values
    experience = make_experience(...)            trainer/experience.py  shaping, KL, advantages, corrections
    metrics    = Learner.update(experience)      trainer/update.py    epochs x minibatches of the jitted step

:class:`RLTrainer` builds them from a run config, runs steps to ``train.steps`` and checkpoints. Sharding: the mesh
comes from ``cfg.mesh``, arrays are placed by the logical-axis rules (``mesh.rules`` on top of the defaults of
:mod:`jaxrl_llm.parallel`). Resuming restores parameters, optimizer state, PRNG key, step and data position, so an
interrupted run continues exactly as an uninterrupted one would.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_llm import paths
from jaxrl_llm.config import ConfigError, TrainConfig, mesh_sizes, save_config, validate
from jaxrl_llm.data import training_prompts
from jaxrl_llm.distributed import host
from jaxrl_llm.errors import Interrupted, blame
from jaxrl_llm.hardware import peak_tflops
from jaxrl_llm.models import load_hf, save_hf
from jaxrl_llm.models.remat import resolve_remat
from jaxrl_llm.parallel import Layout, make_mesh, merge_rules
from jaxrl_llm.rewards import get_reward
from jaxrl_llm.sampling import Sampler
from jaxrl_llm.tokenizer import load_tokenizer
from jaxrl_llm.tracking import MetricsLogger, Progress
from jaxrl_llm.trainer.async_resume import checkpoint_entries
from jaxrl_llm.trainer.evaluation import Evaluator
from jaxrl_llm.trainer.experience import make_experience
from jaxrl_llm.trainer.flops import step_passes
from jaxrl_llm.trainer.guard import StepChecks, check_finite
from jaxrl_llm.trainer.lifecycle import StopWatch, open_checkpoints
from jaxrl_llm.trainer.metrics import rollout_metrics, throughput
from jaxrl_llm.trainer.rollout import RolloutEngine, RolloutWorker, sampling_params, trim_responses
from jaxrl_llm.trainer.scoring import Scorer
from jaxrl_llm.trainer.update import Learner

__all__ = ["RLTrainer", "train", "DTYPES"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _split_devices(cfg: TrainConfig, devices: list) -> tuple[list, list]:
    """(trainer devices, sampler devices): the last ``rollout.sampler_devices`` devices sample in disaggregated
    mode."""
    k = cfg.rollout.sampler_devices
    if not k:
        return devices, []
    if not 0 < k < len(devices):
        raise ConfigError(f"rollout.sampler_devices={k} must leave devices for training (there are {len(devices)})")
    if jax.process_count() > 1:
        raise ValueError("rollout.sampler_devices (disaggregated sampling) is single-process for now")
    return devices[:-k], devices[-k:]


def make_sampler(cfg: TrainConfig, model) -> Sampler:
    """The sampler of a run config for ``model``."""
    r = cfg.rollout
    compact_rows = r.compact_rows
    if compact_rows is None and r.consistency == "exact" and cfg.algorithm.dynamic_sampling:
        # rows drawn from several rounds compact on another schedule in the update's decode pass than in their
        # round; one full-width loop keeps every row in a batch of the sampler's size
        compact_rows = 0
    return Sampler(model, consistency=r.consistency, compute_dtype=DTYPES[r.sampler_dtype] if r.sampler_dtype
                   else None, compact_rows=compact_rows)


def _check_lengths(cfg: TrainConfig, prompt_tokens: int, m) -> None:
    """Prompts and responses must fit the model's positions (``prompt_tokens``: the data's padded prompt length)."""
    if prompt_tokens + cfg.rollout.max_new_tokens > m.max_position_embeddings:
        raise ConfigError(f"data.max_prompt_tokens={prompt_tokens} + rollout.max_new_tokens="
                          f"{cfg.rollout.max_new_tokens} exceeds the model's max_position_embeddings "
                          f"{m.max_position_embeddings} ({cfg.model.path})")


def _check_model_switches(cfg: TrainConfig, m) -> None:
    a, r = cfg.algorithm, cfg.rollout
    if a.bupo_steps and not 0 <= a.bupo_layer < m.num_layers:
        raise ValueError(f"algorithm.bupo_layer={a.bupo_layer} is not a layer of the model "
                         f"(0..{m.num_layers - 1})")
    if r.routing_replay and not m.num_moe_layers:
        raise ValueError("rollout.routing_replay needs a mixture-of-experts model; this one has no MoE layers")
    if r.routing_replay and r.consistency == "exact":
        raise ValueError("rollout.routing_replay is implied by rollout.consistency=exact (the trainer replays "
                         "the sampler's computation); set routing_replay=false")


class RLTrainer:
    """One RL run. ``devices`` restricts the mesh to some devices (default: all). A context manager: leaving it
    waits for background work (async rollouts, checkpoint writes)."""

    def __init__(self, cfg: TrainConfig, devices=None):
        devices = list(jax.devices() if devices is None else devices)
        devices, sampler_devices = _split_devices(cfg, devices)
        validate(cfg, device_count=len(devices))
        a = cfg.algorithm
        self.cfg, self.run_dir = cfg, cfg.log.run_dir
        self.is_main = jax.process_index() == 0
        self.devices = devices + sampler_devices
        self.layout = Layout(make_mesh(mesh_sizes(cfg), devices), merge_rules(cfg.mesh.rules))
        # disaggregated mode: the sampler has devices of its own and receives the weights after every update
        sampler_layout = Layout(make_mesh({"data": -1}, sampler_devices)) if sampler_devices else None
        self.peak_tflops = cfg.log.peak_tflops or peak_tflops(self.devices[0].device_kind)
        model, self.model_cfg = self._load_model()
        _check_model_switches(cfg, self.model_cfg)
        with blame("model.path", cfg.model.path):
            self.tokenizer = load_tokenizer(cfg.model.path, cache_dir=cfg.model.cache_dir)
        self.sampler = sampler = make_sampler(cfg, model)
        self.learner = Learner(cfg, model, self.layout, sampler=sampler,
                               critic_trunk=self._load_model()[0] if a.advantage == "gae" else None)
        ref_state = (nnx.merge_state(jax.tree.map(jnp.copy, self.learner.params), self.learner.rest)
                     if a.kl_coef > 0 else None)
        self.scorer = Scorer(cfg, self.learner.graphdef, sampler, self.layout, ref_state=ref_state)
        # every prompt is validated here (data.max_prompt_tokens derived when null); every process reads only its
        # share of each global batch of prompts (RolloutWorker.sample)
        with blame("data.path" if cfg.data.path else "data.task_kwargs", cfg.data.path or cfg.data.task_kwargs,
                   (OSError, ValueError, TypeError)):
            self.prompts = training_prompts(cfg, self.tokenizer)
        _check_lengths(cfg, self.prompts.encoder.max_tokens, self.model_cfg)
        reward_fns = [(s.name, get_reward(s.name, **s.kwargs), s.weight) for s in cfg.reward.fns]
        self.checks = StepChecks(cfg)  # divergence and failing rewards, after every step (guard.py)
        sampling = sampling_params(cfg, self.tokenizer)
        worker = RolloutWorker(cfg, sampler, sampling, self.prompts.encoder, self.tokenizer, self.prompts.stream,
                               reward_fns, sampler_layout or self.layout, self.layout, jax.random.key(cfg.train.seed),
                               first_errors=self.checks.rewards.first_errors)
        with blame("eval.data.path", cfg.eval.data.path, (OSError, ValueError, TypeError)):
            self.evaluator = Evaluator.for_run(cfg, tokenizer=self.tokenizer, sampler=sampler, sampling=sampling,
                                               reward_fns=reward_fns, layout=self.layout,
                                               holdout=self.prompts.holdout, encoder=self.prompts.encoder)
        self.rollouts = RolloutEngine(worker, asynchronous=cfg.rollout.async_rollout, sampler_layout=sampler_layout,
                                      lag=cfg.rollout.sampler_lag)
        self.step = 0
        self._evaluated: dict[str, float] = {}  # this step's evaluation metrics (rank the best checkpoint)
        self.checkpointer = open_checkpoints(cfg)  # resume, refuse or overwrite (lifecycle.py)
        if self.checkpointer.latest_step() is not None:
            self._restore()

    def _load_model(self):
        """The checkpoint at ``model.path``, placed on the mesh with the configured dtypes and remat policy."""
        m = self.cfg.model
        with blame("model.path", m.path):
            return load_hf(m.path, mesh=self.layout.mesh, rules=self.layout.rules, dtype=DTYPES[m.dtype],
                           param_dtype=DTYPES[m.param_dtype],
                           remat=resolve_remat(m.remat, self.cfg.rollout.max_new_tokens), attention=m.attention,
                           cache_dir=m.cache_dir)

    def __enter__(self) -> "RLTrainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- one step ----------------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        cfg, learner, times = self.cfg, self.learner, {}
        t0 = time.perf_counter()
        self.rollouts.update_weights(learner.policy_state())
        batch = self.rollouts.generate()
        ro = batch.rollout if cfg.rollout.consistency == "exact" else trim_responses(batch.rollout)
        jax.block_until_ready(ro.tokens)
        times["time_rollout_reward"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        bupo = learner.in_bupo_warmup(self.step)
        scores = self.scorer(learner.policy_state(), ro, critic=learner.critic, bupo=bupo)
        step = make_experience(batch, ro, scores, cfg)
        jax.block_until_ready(step.experience.old_logp)
        times["time_score"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        update_metrics = learner.update(step.experience, step.critic_targets, self.step)
        times["time_update"] = time.perf_counter() - t2

        self.step += 1
        metrics = {**update_metrics, **scores.metrics, **step.metrics, **({"bupo_warmup": 1.0} if bupo else {}),
                   **rollout_metrics(ro, step.rewards, batch.per_fn, cfg.rollout.n), **batch.stats, **times}
        passes = step_passes(cfg, old_logp_pass=self.scorer.old_logp_source == "score", bupo_warmup=bupo,
                             score_group=self.scorer.prompt_group, update_group=learner.sharing.update_group)
        metrics.update(throughput(ro, sum(times.values()), self.model_cfg, passes, cfg.rollout.n, self.peak_tflops,
                                  len(self.devices)))
        return {k: float(v) for k, v in metrics.items()}

    # ---- state -------------------------------------------------------------------------------------------

    def _state(self) -> dict:
        # small leaves are replicated over the mesh so they restore next to the sharded parameters
        replicated = self.layout.replicated()
        state = {**self.learner.state(),
                 "key": jax.device_put(jax.random.key_data(self.rollouts.worker.key), replicated),
                 "step": jax.device_put(jnp.asarray(self.step, jnp.int32), replicated)}
        if self.cfg.algorithm.entropy_target is not None:
            state["entropy_coef"] = jax.device_put(jnp.asarray(self.learner.entropy_coef, jnp.float32), replicated)
        if self.cfg.rollout.async_rollout:  # the key and weights the rollouts in the making started from
            state.update(checkpoint_entries(self.rollouts.resume_point, self.learner.params, replicated))
        return state

    def _restore(self) -> None:
        state, meta = self.checkpointer.restore(self._state())
        self.learner.load_state(state)
        self.rollouts.worker.key = jax.random.wrap_key_data(state["key"])
        if "entropy_coef" in state:
            self.learner.entropy_coef = float(state["entropy_coef"])
        self.step = int(state["step"])
        self.rollouts.worker.stream.set_state(meta["data"])
        if meta.get("pending"):  # async: the next step's rollouts, sampled again from the weights saved for them
            self.rollouts.resume(nnx.merge_state(state["sampler_params"], self.learner.rest))
        if self.is_main:
            print(f"[jaxrl_llm] resumed from step {self.step} in {self.checkpointer.directory}")

    def save(self, metrics: dict | None = None) -> None:
        """A checkpoint of this step; ``metrics`` (an evaluation's) rank it when the best one is kept."""
        if self.checkpointer.latest_step() == self.step:  # saved already (a resumed run that had finished)
            return
        critic = self.learner.critic
        check_finite({"policy": self.learner.params, "critic": critic.params if critic else {}},
                     f"the checkpoint of step {self.step}")
        point = self.rollouts.resume_point
        meta = {"data": point.data if point else self.rollouts.worker.stream.get_state(), "step": self.step,
                "pending": bool(point)}
        self.checkpointer.save(self.step, self._state(), meta, metrics=metrics)

    def model(self):
        return self.learner.model()

    def export_hf(self, path: str | None = None) -> str:
        """Write the policy as a Hugging Face checkpoint (called by every process; process 0 writes)."""
        path = path or paths.join(self.run_dir, "hf")
        params = self.learner.params
        check_finite(params, f"the policy to {path}")
        if jax.process_count() > 1:
            params = jax.tree.map(host, params)
        if self.is_main:
            save_hf(nnx.merge(self.learner.graphdef, params, self.learner.rest), path, tokenizer=self.tokenizer)
        return path

    # ---- the loop ----------------------------------------------------------------------------------------

    def train(self, stop_after: int | None = None) -> dict[str, float]:
        """Run to ``train.steps`` (or stop once ``stop_after`` steps are done, as if interrupted)."""
        cfg = self.cfg
        end = cfg.train.steps if stop_after is None else min(stop_after, cfg.train.steps)
        if self.is_main:
            save_config(cfg, paths.join(self.run_dir, "config.yaml"))
        # rows of steps after the restored checkpoint (an attempt that got further) are dropped first
        logger = MetricsLogger.for_run(cfg, enabled=self.is_main, keep_through=self.step)
        if self.evaluator is not None and self.step == 0 and self.evaluator.due(0):
            logger.log(0, self.evaluator.run(0, self.learner.policy_state()))
        last: dict[str, float] = {}
        watch = StopWatch(cfg.checkpoint.every, cfg.checkpoint.every_minutes, self.checkpointer)
        self.checks.start(self.learner.params, self.checkpointer)
        try:
            with watch, Progress(cfg.train.steps, f"{cfg.algorithm.name}", start=self.step,
                                 enabled=self.is_main and cfg.log.progress) as bar:
                while self.step < end:
                    last = self._logged_step(logger, bar)
                    self._after_step(watch)
            if self.checkpointer.latest_step() != self.step:
                self.save()
            self.checkpointer.wait()
        finally:
            logger.close()
        if cfg.checkpoint.export_hf:
            path = self.export_hf()
            if self.is_main:
                print(f"[jaxrl_llm] policy exported to {path}")
        return last

    def _logged_step(self, logger, bar) -> dict[str, float]:
        """One step, its metrics logged; a run that diverged or whose rewards keep failing stops here."""
        metrics = self.train_step()
        if self.evaluator is not None:
            self._evaluated = self.evaluator.maybe_run(self.step, self.learner.policy_state())
            metrics.update(self._evaluated)
        problem = self.checks.inspect(self.step, self.learner.params, metrics)
        logger.log(self.step, metrics)
        if problem is not None:
            raise problem
        bar.update(reward=metrics["reward_mean"], kl=metrics.get("kl_ref", 0.0), ent=metrics.get("entropy", 0.0),
                   tok_s=metrics["tokens_per_sec"])
        return metrics

    def _after_step(self, watch: StopWatch) -> None:
        """Signals, preemption notices and periodic saves at a step boundary."""
        poll = watch.poll(self.step)
        evaluated, self._evaluated = self._evaluated, {}
        if poll.save or (evaluated and self.cfg.checkpoint.best_metric):  # an evaluated step can be the best one
            self.save(metrics=evaluated or None)
            watch.saved()
        if poll.stop:
            self.checkpointer.wait()
            raise Interrupted(f"{poll.stop}: checkpoint of step {self.step} saved in {self.checkpointer.directory}; "
                              "run the same command to resume", self.step)

    def close(self) -> None:
        self.rollouts.close()
        self.prompts.close()
        self.checkpointer.close()


def train(cfg: TrainConfig, *, return_model: bool = False):
    """Run one RL training to the end; the final metrics (and the trained policy with ``return_model``)."""
    with RLTrainer(cfg) as trainer:
        metrics = trainer.train()
        return (metrics, trainer.model()) if return_model else metrics
