"""The RL loop: prompts -> rollouts -> rewards -> advantages -> old/ref log-probs -> minibatch updates -> metrics
-> checkpoint. One :class:`RLTrainer` per run; :meth:`RLTrainer.train` runs it to ``train.steps``.

Sharding: the mesh comes from ``cfg.mesh``; parameters and optimizer state are placed by the models' logical-axis
rules, rollout/update batches are sharded over the data-parallel axes, and the jitted update has explicit
in/out shardings. Resuming restores parameters, optimizer state, PRNG key, step and data position, so an
interrupted run continues exactly as an uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrl_llm import advantages as A
from jaxrl_llm import losses as L
from jaxrl_llm.checkpoint import Checkpointer
from jaxrl_llm.config import TrainConfig, save_config, validate
from jaxrl_llm.data import PromptStream, load_rows, tokenize_prompts
from jaxrl_llm.distributed import gather_blocks, host, owned_rows, rows_on_this_process, sum_blocks
from jaxrl_llm.hardware import peak_tflops
from jaxrl_llm.losses import exploration as X
from jaxrl_llm.metrics import mean_pass_at_k
from jaxrl_llm.models import load_hf, save_hf
from jaxrl_llm.parallel import batch_sharding, make_mesh
from jaxrl_llm.rewards import compute_rewards, get_reward
from jaxrl_llm.sampling import Rollout, Sampler, SamplingParams, mismatch_metrics, rollout_logprobs, score
from jaxrl_llm.sampling import layer_entropies, routing_agreement, sequence_logprobs
from jaxrl_llm.tokenizer import load_tokenizer
from jaxrl_llm.tracking import MetricsLogger, Progress
from jaxrl_llm.trainer.critic import init_value_head, make_critic_step, token_level_rewards, token_values
from jaxrl_llm.trainer.optim import opt_state_shardings, run_optimizer
from jaxrl_llm.trainer.packing import packed_rows_multiple, plan_packing, prompt_sharing
from jaxrl_llm.trainer.step import Experience, LossConfig, jit_update_step, minibatch_normalizer, split_micro

__all__ = ["RLTrainer", "train"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# Each as one program: op-by-op dispatch over a mesh puts many small independent collective programs in flight at
# once, which XLA:CPU's in-process collectives can deadlock on.
_mismatch_metrics = jax.jit(mismatch_metrics)
_rollout_correction = jax.jit(L.rollout_correction, static_argnames=("is_level", "cap", "mask_level", "low", "high"))


def _concat_rollouts(parts: list[Rollout]) -> Rollout:
    if len(parts) == 1:
        return parts[0]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1 if xs[0].ndim == 4 else 0), *parts)


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


def _shardings(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def _take_rows(ro: Rollout, idx: np.ndarray) -> Rollout:
    def take(x):
        return x[:, idx] if x.ndim == 4 else x[idx]  # MoE routes are [L, N, T, k]

    return jax.tree.map(take, ro)


_ROWS_AXES = ("data", "fsdp")


def _rows_sharding(mesh, rows: int) -> NamedSharding:
    """Where ``rows`` rows live: split over the mesh's data-parallel axes, or everywhere when they do not divide."""
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    return batch_sharding(mesh, ndim=1) if rows % ways == 0 else NamedSharding(mesh, P())


def _place_rows(tree, mesh):
    """Shard the row axis of every leaf over the mesh's data-parallel axes (axis 1 of MoE routes
    ``[L, N, T, k]``); left as is when the rows do not divide."""
    ways = mesh.shape["data"] * mesh.shape["fsdp"]

    def place(x):
        row_axis = 1 if getattr(x, "ndim", 0) == 4 else 0
        if getattr(x, "ndim", 0) == 0 or x.shape[row_axis] % ways:
            return x
        spec = P(*([None] * row_axis), _ROWS_AXES)
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(place, tree)


def _split_devices(cfg: TrainConfig, devices: list) -> tuple[list, list]:
    """(trainer devices, sampler devices): the last ``rollout.sampler_devices`` devices sample in disaggregated
    mode."""
    k = cfg.rollout.sampler_devices
    if not k:
        return devices, []
    if not 0 < k < len(devices):
        raise ValueError(f"rollout.sampler_devices={k} must leave devices for training (there are {len(devices)})")
    if jax.process_count() > 1:
        raise ValueError("rollout.sampler_devices (disaggregated sampling) is single-process for now")
    return devices[:-k], devices[-k:]


def _take_experience(exp: Experience, idx) -> Experience:
    routes = exp.forced_experts  # [L_moe, N, T, k]: rows are on axis 1
    part = jax.tree.map(lambda x: x[idx], exp.replace(forced_experts=None))
    return part if routes is None else part.replace(forced_experts=routes[:, idx])


class RLTrainer:
    """One RL run. ``devices`` restricts the mesh to some devices (default: all)."""

    def __init__(self, cfg: TrainConfig, devices=None):
        devices = list(jax.devices() if devices is None else devices)
        devices, sampler_devices = _split_devices(cfg, devices)
        validate(cfg, device_count=len(devices))
        self.cfg = cfg
        self.is_main = jax.process_index() == 0
        self.run_dir = cfg.log.run_dir
        self.mesh = make_mesh(dataclasses.asdict(cfg.mesh), devices)
        # disaggregated mode: the sampler has devices of its own and receives the weights after every update
        self.sampler_mesh = make_mesh({"data": -1}, sampler_devices) if sampler_devices else None
        self._pending = None  # the next step's rollouts, in the making (rollout.async_rollout)
        self._executor = ThreadPoolExecutor(max_workers=1) if cfg.rollout.async_rollout else None
        self.devices = devices + sampler_devices
        self.peak_tflops = cfg.log.peak_tflops or peak_tflops(self.devices[0].device_kind)
        model, self.model_cfg = self._load_model()
        self.tokenizer = load_tokenizer(cfg.model.path)
        self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
        a, r, t = cfg.algorithm, cfg.rollout, cfg.train
        self.ref_params = jax.tree.map(jnp.copy, self.params) if a.kl_coef > 0 else None
        sampler_dtype = _DTYPES[r.sampler_dtype] if r.sampler_dtype else None
        self.sampler = Sampler(model, consistency=r.consistency, compute_dtype=sampler_dtype,
                               compact_rows=r.compact_rows)
        stops = tuple(i for i in (self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>"))
                      if isinstance(i, int) and i >= 0 and i != self.tokenizer.unk_token_id)
        self.sampling = SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, min_p=r.min_p,
                                       max_new_tokens=r.max_new_tokens, n=r.n, stop_tokens=stops)
        self.loss_cfg = LossConfig.of(cfg)
        self._check_model_switches()
        self.entropy_coef = float(a.entropy_coef)
        self.optimizer, self.opt_state = self._optimizer(t.lr, self.params)
        temperature, chunk = r.temperature, t.logprob_chunk
        # rows come in groups of n samples of one prompt, run once per group where possible (packing.py)
        self.prompt_group, self.update_group, self.pack_responses = prompt_sharing(cfg)
        self.pack_rows = packed_rows_multiple(self.mesh.shape["data"] * self.mesh.shape["fsdp"], t.micro_batch_size)

        def logprob_fn_of(layer):
            group = self.update_group if layer is None else 1

            def logprob_fn(m, exp: Experience):
                return sequence_logprobs(m, exp.prompt_ids, exp.prompt_mask, exp.tokens, exp.mask,
                                         temperature=temperature, chunk=chunk, forced_experts=exp.forced_experts,
                                         layer=layer, group=group, packing=exp.packing)
            return logprob_fn

        param_sh, opt_sh, rest_sh = _shardings(self.params), _shardings(self.opt_state), _shardings(self.rest)
        self.batch_spec = NamedSharding(self.mesh, P(None, ("data", "fsdp")))

        def jit_update(layer):
            return jit_update_step(self.graphdef, self.optimizer, self.loss_cfg, logprob_fn_of(layer), param_sh,
                                   rest_sh, opt_sh)

        self._update = jit_update(None)
        # BuPO warm-up: the same update on the policy read out after layer bupo_layer (only layers <= l and the
        # unembedding receive gradient)
        self._update_bupo = jit_update(a.bupo_layer) if a.bupo_steps else None
        self.critic = self._build_critic() if a.advantage == "gae" else None
        self.old_logp_from_update = self._old_logp_from_update()
        # every process reads only its share of each global batch of prompts (see _rollout)
        self.stream = PromptStream(load_rows(cfg.data), t.prompts_per_step, seed=cfg.data.seed,
                                   shuffle=cfg.data.shuffle)
        self.reward_fns = [(s.name, get_reward(s.name, **s.kwargs), s.weight) for s in cfg.reward.fns]
        self.key = jax.random.key(t.seed)
        self.step = 0
        self.checkpointer = Checkpointer(os.path.join(self.run_dir, "checkpoints"), keep=cfg.checkpoint.keep,
                                         async_save=cfg.checkpoint.async_save)
        if cfg.checkpoint.resume and self.checkpointer.latest_step() is not None:
            self._restore()

    def _check_model_switches(self) -> None:
        a, r, m = self.cfg.algorithm, self.cfg.rollout, self.model_cfg
        if self.cfg.data.max_prompt_tokens + r.max_new_tokens > m.max_position_embeddings:
            raise ValueError(f"data.max_prompt_tokens={self.cfg.data.max_prompt_tokens} + rollout.max_new_tokens="
                             f"{r.max_new_tokens} exceeds the model's max_position_embeddings "
                             f"{m.max_position_embeddings} ({self.cfg.model.path})")
        if a.bupo_steps and not 0 <= a.bupo_layer < m.num_layers:
            raise ValueError(f"algorithm.bupo_layer={a.bupo_layer} is not a layer of the model "
                             f"(0..{m.num_layers - 1})")
        if r.routing_replay and not m.num_moe_layers:
            raise ValueError("rollout.routing_replay needs a mixture-of-experts model; this one has no MoE layers")
        if r.routing_replay and r.consistency == "exact":
            raise ValueError("rollout.routing_replay is implied by rollout.consistency=exact (the trainer replays "
                             "the sampler's computation); set routing_replay=false")

    def _old_logp_from_update(self) -> bool:
        """Whether old log-probs come from the update's own forward instead of a scoring pass: only for a single
        update on fresh rollouts (the policy before it is the one that scores), when nothing needs them before
        the update (rollout correction, KL to a reference, Differential Smoothing, BuPO) and the sampler is not
        in exact mode (whose scoring pass replays the sampler's computation bit for bit)."""
        a = self.cfg.algorithm
        return (a.old_logp == "auto" and a.ppo_epochs * a.minibatches == 1 and a.rollout_is == "none"
                and a.rollout_mask == "none" and self.ref_params is None and not (a.ds_gamma_pos or a.ds_gamma_neg)
                and not a.bupo_steps and self.cfg.rollout.consistency != "exact")

    def _in_bupo_warmup(self) -> bool:
        return self._update_bupo is not None and self.step < self.cfg.algorithm.bupo_steps

    def _load_model(self):
        """The checkpoint at ``model.path``, placed on the mesh with the configured dtypes and remat policy."""
        m = self.cfg.model
        return load_hf(m.path, mesh=self.mesh, dtype=_DTYPES[m.dtype], param_dtype=_DTYPES[m.param_dtype],
                       remat=m.remat, attention=m.attention)

    def _optimizer(self, lr: float, params):
        """AdamW with the run's schedule (one update per minibatch) and its state placed on the mesh."""
        optimizer = run_optimizer(self.cfg, lr)
        shardings = opt_state_shardings(optimizer, params, NamedSharding(self.mesh, P()))
        return optimizer, jax.jit(optimizer.init, out_shardings=shardings)(params)

    def _build_critic(self) -> dict:
        """The separate value model of PPO: trunk from the policy checkpoint, zero value head, own optimizer."""
        a, t = self.cfg.algorithm, self.cfg.train
        trunk_model, _ = self._load_model()
        graphdef, trunk, rest = nnx.split(trunk_model, nnx.Param, ...)
        replicated = NamedSharding(self.mesh, P())
        head = jax.device_put(init_value_head(self.model_cfg.hidden_size), replicated)
        params = {"trunk": trunk, "head": head}
        optimizer, opt_state = self._optimizer(a.critic_lr or t.lr, params)
        param_sh, opt_sh, rest_sh = _shardings(params), _shardings(opt_state), _shardings(rest)
        update = jax.jit(make_critic_step(graphdef, optimizer, value_clip=a.value_clip),
                         in_shardings=(param_sh, rest_sh, opt_sh, None), out_shardings=(param_sh, opt_sh, None),
                         donate_argnums=(0, 2))

        @jax.jit
        def values(params, rest, prompt_ids, prompt_mask, tokens, mask):
            model = nnx.merge(graphdef, params["trunk"], rest)
            return token_values(model, params["head"], prompt_ids, prompt_mask, tokens, mask)

        return {"params": params, "opt_state": opt_state, "rest": rest, "update": update, "values": values}

    # ---- state -------------------------------------------------------------------------------------------

    def _state(self) -> dict:
        # small leaves are replicated over the mesh so they restore next to the sharded parameters
        replicated = NamedSharding(self.mesh, P())
        return {"params": self.params, "opt_state": self.opt_state,
                "key": jax.device_put(jax.random.key_data(self.key), replicated),
                "step": jax.device_put(jnp.asarray(self.step, jnp.int32), replicated),
                **({"critic": {"params": self.critic["params"], "opt_state": self.critic["opt_state"]}}
                   if self.critic else {}),
                **({"entropy_coef": jax.device_put(jnp.asarray(self.entropy_coef, jnp.float32), replicated)}
                   if self.loss_cfg.entropy_target is not None else {})}

    def _restore(self) -> None:
        state, meta = self.checkpointer.restore(self._state())
        self.params, self.opt_state = state["params"], state["opt_state"]
        if self.critic:
            self.critic.update(state["critic"])
        self.key = jax.random.wrap_key_data(state["key"])
        if "entropy_coef" in state:
            self.entropy_coef = float(state["entropy_coef"])
        self.step = int(state["step"])
        self.stream.set_state(meta["data"])
        if self.is_main:
            print(f"[jaxrl_llm] resumed from step {self.step} in {self.checkpointer.directory}")

    def save(self) -> None:
        self.checkpointer.save(self.step, self._state(), {"data": self.stream.get_state(), "step": self.step})

    def model(self):
        return nnx.merge(self.graphdef, self.params, self.rest)

    def export_hf(self, path: str | None = None) -> str:
        """Write the policy as a Hugging Face checkpoint (called by every process; process 0 writes)."""
        path = path or os.path.join(self.run_dir, "hf")
        params = jax.tree.map(host, self.params) if jax.process_count() > 1 else self.params
        if self.is_main:
            save_hf(nnx.merge(self.graphdef, params, self.rest), path, tokenizer=self.tokenizer)
        return path

    # ---- one step ----------------------------------------------------------------------------------------

    def _sampler_state(self):
        """The policy weights as the sampler will read them: resharded onto the sampler's devices in
        disaggregated mode, and a copy in async mode (the next update donates the live buffers)."""
        state = nnx.merge_state(self.params, self.rest)
        if self.sampler_mesh is not None:
            return jax.device_put(state, NamedSharding(self.sampler_mesh, P()))
        if self._executor is not None:
            return jax.tree.map(jnp.copy, state)
        return state

    def _next_rollouts(self):
        """This step's rollouts. Async mode samples the next step's from the weights before this step's update
        (one step off-policy); the first step (and the first after a resume) samples synchronously.

        With its own sampler devices the whole collection runs in a background thread while this step trains.
        On the trainer's own devices every device call stays on this thread (two threads' multi-device programs
        in flight at once can deadlock XLA's collectives): the next step's first round is sampled here, before
        this step's update, and only its host work (decoding, rewards) overlaps the update."""
        if self._executor is None:
            return self._collect(self._sampler_state())
        stale = self._pending is not None
        if self.sampler_mesh is not None:
            if not stale:
                self._pending = self._executor.submit(self._collect, self._sampler_state())
            collected = self._pending.result()
            self._pending = self._executor.submit(self._collect, self._sampler_state())
        else:
            state, first = self._pending if stale else (self._sampler_state(), None)
            collected = self._collect(state, first)
            state = self._sampler_state()
            self._pending = (state, self._executor.submit(self._finish_rollout, self._sample(state)))
        ro, rewards, per_fn, stats, extra = collected
        # updates between the weights that sampled and the weights that train
        return ro, rewards, per_fn, stats, dict(extra, rollout_staleness=float(stale))

    def _rollout(self, state):
        return self._finish_rollout(self._sample(state))

    def _sample(self, state) -> dict:
        """Device part of one rollout round: a global batch of prompts sampled ``n`` times. Each process reads
        only the prompts its sampling devices hold and those of the rollout rows whose rewards it computes (its
        block of rows)."""
        cfg, n, b = self.cfg, self.cfg.rollout.n, self.cfg.train.prompts_per_step
        mesh = self.sampler_mesh or self.mesh
        owned = owned_rows(b * n)
        positions = np.union1d(rows_on_this_process(_rows_sharding(mesh, b), b), owned // n)
        rows = dict(zip(positions.tolist(), self.stream.next_batch(positions)))
        local_ids, local_mask = tokenize_prompts(self.tokenizer, [rows[i]["prompt"] for i in positions],
                                                 cfg.data.max_prompt_tokens, chat_template=cfg.data.chat_template)
        ids = np.zeros((b,) + local_ids.shape[1:], local_ids.dtype)
        mask = np.zeros((b,) + local_mask.shape[1:], bool)
        ids[positions], mask[positions] = local_ids, local_mask  # rows held elsewhere stay unread
        # prompts split over the data-parallel devices, so each samples its share instead of all of them
        self.key, sub = jax.random.split(self.key)
        # global arrays from the rows this process read (each device takes its own rows)
        sharding = _rows_sharding(mesh, b)
        ids, mask = (jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index]) for x in (ids, mask))
        ro = self.sampler.generate(state, ids, mask, self.sampling, sub)
        if self.sampler_mesh is not None:  # back to the trainer's devices
            ro = _place_rows(ro, self.mesh)
        return dict(ro=ro, rows=rows, owned=owned, positions=positions, tokens=host(ro.tokens),
                    lengths=host(ro.lengths))

    def _finish_rollout(self, sample: dict):
        """Host part of one rollout round (no device calls): decoding and the rewards of this process's rows."""
        n = self.cfg.rollout.n
        owned, rows, tokens, lengths = (sample[k] for k in ("owned", "rows", "tokens", "lengths"))
        completions = self.tokenizer.batch_decode([tokens[r, :lengths[r]] for r in owned], skip_special_tokens=True)
        mine = [rows[r // n] for r in owned]
        columns = {k: [row.get(k) for row in mine] for k in mine[0] if k != "prompt"}
        rewards, per_fn, stats = compute_rewards(self.reward_fns, [row["prompt"] for row in mine], completions,
                                                 columns, timeout=self.cfg.reward.timeout)
        total = len(tokens)
        rewards = gather_blocks(rewards, total)
        per_fn = {k: gather_blocks(v, total) for k, v in per_fn.items()}
        # prompts_read: rows this process read (logged by process 0)
        return sample["ro"], rewards, per_fn, dict(sum_blocks(stats, len(owned), total),
                                                   prompts_read=len(sample["positions"]))

    def _collect(self, state, first=None):
        """Rollouts for one step; with dynamic sampling, resample until enough groups are informative. ``first``
        (a future) holds a first round already sampled from ``state``."""
        a, n, g = self.cfg.algorithm, self.cfg.rollout.n, self.cfg.train.prompts_per_step
        parts, tries = [], 0
        while True:
            tries += 1
            parts.append(first.result() if first is not None and tries == 1 else self._rollout(state))
            if not a.dynamic_sampling:
                break
            informative = sum(int(np.asarray(A.informative_groups(p[1].reshape(-1, n))).sum()) for p in parts)
            if informative >= g or tries >= a.max_sampling_tries:
                break
        ro = _concat_rollouts([p[0] for p in parts])
        rewards = np.concatenate([p[1] for p in parts])
        per_fn = {k: np.concatenate([p[2][k] for p in parts]) for k in parts[0][2]}
        stats = {k: sum(p[3][k] for p in parts) for k in parts[0][3]}
        extra = {"sampling_tries": float(tries)}
        if a.dynamic_sampling:
            groups = rewards.reshape(-1, n)
            info = np.asarray(A.informative_groups(groups))
            order = np.concatenate([np.flatnonzero(info), np.flatnonzero(~info)])[:g]
            extra["dynamic_fill_rate"] = float(min(info.sum(), g) / g)
            rows = (order[:, None] * n + np.arange(n)[None]).reshape(-1)
            ro = _take_rows(ro, rows)
            rewards = rewards[rows]
            per_fn = {k: v[rows] for k, v in per_fn.items()}
        return ro, rewards, per_fn, stats, extra

    def _advantages(self, rewards: np.ndarray, mask, old_logp, correct: np.ndarray) -> jax.Array:
        a, n = self.cfg.algorithm, self.cfg.rollout.n
        groups = jnp.asarray(rewards, jnp.float32).reshape(-1, n)
        if a.advantage == "grpo":
            adv = A.grpo(groups)
        elif a.advantage == "drgrpo":
            adv = A.grpo(groups, scale_by_std=False)
        elif a.advantage == "rloo":
            adv = A.rloo(groups)
        elif a.advantage == "reinforce_pp_baseline":
            adv = A.reinforce_pp_baseline(groups)
        elif a.advantage == "passk":
            adv = A.passk(groups, k=a.passk_k)
        else:
            raise ValueError(f"algorithm.advantage={a.advantage!r} is not a group baseline")
        adv = adv.reshape(-1)
        if a.ds_gamma_pos or a.ds_gamma_neg:
            seq_logp = A.sequence_logprob(old_logp, mask, length_norm=a.ds_length_norm)
            adv = A.differential_smoothing(adv, seq_logp, jnp.asarray(correct), gamma_pos=a.ds_gamma_pos,
                                           gamma_neg=a.ds_gamma_neg)
        return A.broadcast_over_tokens(adv, mask)

    def _rows_split(self):
        """The trainer's mesh as context while scoring and updates are traced: their activations then stay split by
        rows and each layer's weights are gathered (parallel.constrain_rows). Not for the sampler: for one-token
        decode steps moving the activations is cheaper than moving the weights."""
        return jax.set_mesh(self.mesh)

    def train_step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        return self._train_on(self._next_rollouts(), t0)

    def _train_on(self, collected, t0: float) -> dict[str, float]:
        cfg, a = self.cfg, self.cfg.algorithm
        times = {}
        ro, rewards, per_fn, rstats, extra = collected
        if cfg.rollout.consistency != "exact":  # exact mode replays the sampler's own shapes
            ro = trim_responses(ro)
        jax.block_until_ready(ro.tokens)
        times["time_rollout_reward"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        state = nnx.merge_state(self.params, self.rest)
        temperature, chunk = cfg.rollout.temperature, cfg.train.logprob_chunk
        replay = ro.experts if cfg.rollout.routing_replay else None
        metrics: dict[str, Any] = {}
        old_logp = None  # from the update's forward, which also reports the mismatch
        if not self.old_logp_from_update:
            with self._rows_split():
                old_logp, _ = rollout_logprobs(self.sampler, self.graphdef, state, ro, temperature=temperature,
                                               chunk=chunk, forced_experts=replay, group=self.prompt_group)
            metrics.update(_mismatch_metrics(ro.logprobs, old_logp, ro.mask))
        metrics.update(self._diagnostics(state, ro))
        is_weights = None
        if a.rollout_is != "none" or a.rollout_mask != "none":
            is_weights, rc = _rollout_correction(old_logp, ro.logprobs, ro.mask, is_level=a.rollout_is,
                                                  cap=a.rollout_is_cap, mask_level=a.rollout_mask,
                                                  low=a.rollout_mask_low, high=a.rollout_mask_high)
            metrics.update(rc)
        ref_logp = None
        kl_penalty = None  # per-token -kl_coef * KL_t when the KL is part of the reward
        if self.ref_params is not None:
            ref_state = nnx.merge_state(self.ref_params, self.rest)
            with self._rows_split():
                ref_logp, _ = score(self.graphdef, ref_state, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask,
                                    temperature=temperature, chunk=chunk, group=self.prompt_group)
            kl_tok = jnp.where(ro.mask, L.kl(old_logp, ref_logp, a.kl_estimator), 0.0)
            metrics["kl_ref"] = float(jnp.sum(kl_tok) / jnp.maximum(ro.mask.sum(), 1))
            if a.kl_in_reward:
                kl_penalty = -a.kl_coef * kl_tok
        if a.overlong_penalty:
            rewards = rewards + np.asarray(A.overlong_penalty(
                host(ro.lengths), max_len=cfg.rollout.max_new_tokens, cache_len=a.overlong_cache))
        # token-level credit (gae, reinforce_pp) puts the outcome on the last token and the KL on every token
        token_rewards = token_level_rewards(rewards, ro.mask, kl_penalty) if a.advantage in ("gae", "reinforce_pp") \
            else None
        if kl_penalty is not None:  # the sequence reward trained on (and logged) includes the KL penalty
            rewards = rewards + host(jnp.sum(kl_penalty, axis=1))
        critic_batch = None
        if a.advantage == "gae":
            c = self.critic
            old_values = c["values"](c["params"], c["rest"], ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask)
            adv, returns = A.gae(token_rewards, old_values, ro.mask, gamma=a.gamma, lam=a.lam)
            adv = A.whiten(adv, ro.mask)
            critic_batch = {"prompt_ids": ro.prompt_ids, "prompt_mask": ro.prompt_mask, "tokens": ro.tokens,
                            "mask": ro.mask, "old_values": old_values, "returns": returns}
            metrics["explained_variance"] = float(_explained_variance(old_values, returns, ro.mask))
        elif a.advantage == "reinforce_pp":
            adv = A.reinforce_pp(token_rewards, ro.mask, gamma=a.gamma)
        else:
            correct = next(iter(per_fn.values())) > 0
            adv = self._advantages(rewards, ro.mask, old_logp, correct)
        bupo = self._in_bupo_warmup()
        loss_old_logp = old_logp
        if bupo:  # the warm-up's ratio is between internal-layer policies
            with self._rows_split():
                loss_old_logp, _ = score(self.graphdef, state, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask,
                                         temperature=temperature, chunk=chunk, forced_experts=replay,
                                         layer=a.bupo_layer)
            metrics["bupo_warmup"] = 1.0
        jax.block_until_ready(loss_old_logp)
        times["time_score"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        exp = Experience(prompt_ids=ro.prompt_ids, prompt_mask=ro.prompt_mask, tokens=ro.tokens, mask=ro.mask,
                         advantages=adv, old_logp=loss_old_logp, ref_logp=ref_logp, is_weights=is_weights,
                         forced_experts=replay, sampler_logp=ro.logprobs)
        update_metrics = self._update_epochs(exp, critic_batch, bupo=bupo)
        if a.entropy_target is not None:
            self.entropy_coef = float(X.adaptive_entropy_coef(
                self.entropy_coef, update_metrics["entropy"], target=a.entropy_target, step=a.entropy_coef_step,
                max_coef=a.entropy_coef_max))
        times["time_update"] = time.perf_counter() - t2

        self.step += 1
        metrics.update(update_metrics)
        metrics.update(self._rollout_metrics(ro, rewards, per_fn))
        metrics.update(rstats)
        metrics.update(extra)
        metrics.update(times)
        total_time = sum(times.values())
        tokens = float(jnp.sum(ro.mask) + jnp.sum(ro.prompt_mask))
        metrics["tokens_per_sec"] = tokens / total_time
        # 6 N FLOPs per trained token (forward + backward) + 2 N per sampled/scored token
        flops = (6 * self.model_cfg.num_params() * tokens * a.ppo_epochs + 4 * self.model_cfg.num_params() * tokens)
        metrics["model_tflops_per_sec"] = flops / total_time / 1e12
        if self.peak_tflops is not None:  # model FLOPs utilisation of every device the run uses
            metrics["mfu"] = metrics["model_tflops_per_sec"] / (self.peak_tflops * len(self.devices))
        return {k: float(v) for k, v in metrics.items()}

    def _diagnostics(self, state, ro: Rollout) -> dict[str, float]:
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

    def _update_epochs(self, exp: Experience, critic_batch: dict | None = None, bupo: bool = False) -> dict[str, float]:
        """``ppo_epochs`` x minibatches updates of the policy (the BuPO warm-up's internal-layer update with ``bupo``,
        which reads out a layer and so neither shares prompts nor packs)."""
        cfg, a = self.cfg, self.cfg.algorithm
        update = self._update_bupo if bupo else self._update
        pack = self.pack_responses and not bupo
        rows = exp.num_rows
        mb = rows // a.minibatches
        num_micro = mb // cfg.train.micro_batch_size
        sums: dict[str, float] = {}
        per_update: dict[str, float] = {}
        count = 0
        for epoch in range(a.ppo_epochs):
            # whole groups are shuffled when updates share prompts, so every micro-batch holds whole groups
            g = self.update_group
            groups = np.random.default_rng((cfg.train.seed, self.step, epoch)).permutation(rows // g)
            perm = (groups[:, None] * g + np.arange(g)).reshape(-1)
            for i in range(a.minibatches):
                idx = jnp.asarray(perm[i * mb:(i + 1) * mb])
                part = _take_experience(exp, idx)
                if pack:
                    part = part.replace(packing=plan_packing(host(part.mask), group=self.update_group,
                                                             num_micro=num_micro, row_multiple=self.pack_rows))
                norm = minibatch_normalizer(part.mask, self.loss_cfg)
                micro = self._place_micro(split_micro(part, num_micro))
                j = epoch * a.minibatches + i
                control = {"entropy_coef": jnp.float32(self.entropy_coef),
                           "key": jax.random.fold_in(jax.random.key(cfg.train.seed), self.step * 4096 + j)}
                with self._rows_split():
                    self.params, self.opt_state, m = update(self.params, self.rest, self.opt_state, micro, norm,
                                                            control)
                if "offpolicy_kl" in m:  # the policy's drift from the sampler, update by update
                    per_update[f"offpolicy_kl/update{j}"] = float(m["offpolicy_kl"])
                if critic_batch is not None:
                    m = dict(m, **self._update_critic(critic_batch, idx, num_micro))
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1
        out = {k: v / count for k, v in sums.items()}
        out["skipped_nonfinite"] = sums.get("skipped_nonfinite", 0.0)
        if len(per_update) > 1:
            out.update(per_update)
        return out

    def _place_micro(self, micro: Experience) -> Experience:
        """Micro-batches ``[num_micro, rows, ...]`` sharded over rows (MoE routes ``[num_micro, L, rows, ...]``)."""
        routes = micro.forced_experts
        micro = jax.device_put(micro.replace(forced_experts=None), self.batch_spec)
        if routes is None:
            return micro
        route_spec = NamedSharding(self.mesh, P(None, None, ("data", "fsdp")))
        return micro.replace(forced_experts=jax.device_put(routes, route_spec))

    def _update_critic(self, batch: dict, idx, num_micro: int) -> dict:
        c = self.critic
        part = {k: v[idx] for k, v in batch.items()}
        micro = jax.device_put({k: v.reshape((num_micro, -1) + v.shape[1:]) for k, v in part.items()},
                               self.batch_spec)
        c["params"], c["opt_state"], m = c["update"](c["params"], c["rest"], c["opt_state"], micro)
        return m

    def _rollout_metrics(self, ro: Rollout, rewards: np.ndarray, per_fn: dict) -> dict[str, float]:
        n = self.cfg.rollout.n
        lengths = host(ro.lengths)
        first = next(iter(per_fn.values()))
        correct = (first > 0).reshape(-1, n)
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

    # ---- the loop ----------------------------------------------------------------------------------------

    def train(self, stop_after: int | None = None) -> dict[str, float]:
        """Run to ``train.steps`` (or stop once ``stop_after`` steps are done, as if interrupted)."""
        cfg = self.cfg
        end = cfg.train.steps if stop_after is None else min(stop_after, cfg.train.steps)
        if self.is_main:
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        logger = MetricsLogger(self.run_dir, jsonl=cfg.log.jsonl, tensorboard=cfg.log.tensorboard,
                               enabled=self.is_main)
        last: dict[str, float] = {}
        with Progress(cfg.train.steps, f"{cfg.algorithm.name}", enabled=self.is_main and cfg.log.progress,
                      start=self.step) as bar:
            while self.step < end:
                last = self.train_step()
                logger.log(self.step, last)
                bar.update(reward=last["reward_mean"], kl=last.get("kl_ref", 0.0),
                           ent=last.get("entropy", 0.0), tok_s=last["tokens_per_sec"])
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save()
        if not cfg.checkpoint.every or self.step % cfg.checkpoint.every:
            self.save()
        self.checkpointer.wait()
        logger.close()
        if cfg.checkpoint.export_hf:
            path = self.export_hf()
            if self.is_main:
                print(f"[jaxrl_llm] policy exported to {path}")
        return last

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)  # lets an in-flight rollout finish; its result is dropped
            self._pending = None
        self.checkpointer.close()


def _explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over valid tokens: how much of the return the critic predicts."""
    m = jnp.asarray(mask, jnp.float32)
    count = jnp.maximum(m.sum(), 1.0)

    def var(x):
        mean = jnp.sum(x * m) / count
        return jnp.sum(jnp.square(x - mean) * m) / count

    return 1.0 - var(returns - values) / jnp.maximum(var(returns), 1e-8)


def train(cfg: TrainConfig, *, return_model: bool = False):
    """Run one RL training to the end; the final metrics (and the trained policy with ``return_model``)."""
    trainer = RLTrainer(cfg)
    try:
        metrics = trainer.train()
        return (metrics, trainer.model()) if return_model else metrics
    finally:
        trainer.close()
