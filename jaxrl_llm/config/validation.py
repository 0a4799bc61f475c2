"""Cross-field checks of a run config (:func:`validate`): choices among the known names, bounds, batch sizes
that must divide, the mesh against the devices. Every failure raises :class:`ConfigError` naming the key."""
from __future__ import annotations

import difflib
import math

from .names import (
    ADVANTAGES, AGG_MODES, ATTENTION, CLIPPED_LOSSES, CONSISTENCY, COV_PENALTIES, CRITICS, DTYPES, GROUP_ADVANTAGES,
    KL_ESTIMATORS, LOGICAL_AXES, MESH_AXES, POLICY_LOSSES, REMAT, ROLLOUT_IS, ROLLOUT_MASK, SCHEDULES, SOURCES,
    TASKS, TRUNCATE,
)
from .schema import ConfigError, DataSection, TrainConfig, mesh_sizes

__all__ = ["validate"]


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


def _choice(value, key: str, allowed) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: got {value!r}; allowed: {', '.join(map(str, allowed))}{hint}")


_FILE_SUFFIXES = {"jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz"), "parquet": (".parquet", ".pq")}


def _check_model_data(cfg: TrainConfig) -> None:
    m = cfg.model
    _require(bool(m.path), "model.path", "must name a Hugging Face checkpoint directory")
    _choice(m.dtype, "model.dtype", DTYPES)
    _choice(m.param_dtype, "model.param_dtype", DTYPES)
    _choice(m.remat, "model.remat", REMAT)
    _choice(m.attention, "model.attention", ATTENTION)
    _check_data(cfg.data, "data", SOURCES)


def _check_data(d: DataSection, key: str, sources) -> None:
    """The checks of a data section (``data`` or ``eval.data``), naming keys under ``key``."""
    _choice(d.source, f"{key}.source", sources)
    if d.source == "none":
        return
    if d.source == "task":
        _choice(d.task, f"{key}.task", TASKS)
    elif d.source == "gym":
        _require(bool(d.task), f"{key}.task", f"must name a reasoning-gym dataset for {key}.source=gym")
    else:
        _require(bool(d.path), f"{key}.path", f"needed for {key}.source={d.source}")
        for kind, suffixes in _FILE_SUFFIXES.items():
            _require(kind == d.source or not d.path.lower().endswith(suffixes), f"{key}.path",
                     f"{d.path!r} looks like a {kind} file but {key}.source={d.source}")
    _require(bool(d.prompt_key), f"{key}.prompt_key", "must be a column name")
    _require(bool(d.messages_key), f"{key}.messages_key", "must be a column name")
    _require(bool(d.answer_key), f"{key}.answer_key", "must be a column name")
    _require(d.max_prompt_tokens is None or d.max_prompt_tokens >= 1, f"{key}.max_prompt_tokens",
             f"must be >= 1 or null (derived from the data), got {d.max_prompt_tokens}")
    _choice(d.truncate, f"{key}.truncate", TRUNCATE)
    _require(d.validate or d.max_prompt_tokens is not None, f"{key}.max_prompt_tokens",
             f"must be given when {key}.validate=false (it is derived by reading every prompt at start)")
    _require(d.chat_template or d.system_prompt is None, f"{key}.system_prompt",
             f"is a turn of the chat template: set {key}.chat_template=true")
    _require(d.chat_template or not d.chat_template_kwargs, f"{key}.chat_template_kwargs",
             f"are arguments of the chat template: set {key}.chat_template=true")
    _require(d.read_threads >= 1, f"{key}.read_threads", f"must be >= 1, got {d.read_threads}")
    _require(d.prefetch_batches >= 0, f"{key}.prefetch_batches", f"must be >= 0, got {d.prefetch_batches}")
    _require(0 <= d.seed < 2 ** 32, f"{key}.seed", f"must be in [0, 2**32), got {d.seed}")


def _check_eval(cfg: TrainConfig) -> None:
    e = cfg.eval
    _require(e.every >= 0, "eval.every", f"must be >= 0 (0: no evaluation during training), got {e.every}")
    _check_data(e.data, "eval.data", SOURCES + ("none",))
    if e.split is not None:
        _require(0 < e.split < 1 or (e.split >= 1 and float(e.split).is_integer()), "eval.split",
                 f"must be a fraction in (0, 1) or a whole number of rows, got {e.split}")
    if e.every or e.at_start:
        _require((e.data.source != "none") != (e.split is not None), "eval.data.source",
                 "evaluation needs one held-out set: eval.data (source jsonl, parquet, ...) or eval.split "
                 f"(rows held out of the training data), got eval.data.source={e.data.source}, eval.split={e.split}")
    _require(e.n >= 1, "eval.n", f"must be >= 1, got {e.n}")
    _require(e.batch_prompts >= 1, "eval.batch_prompts", f"must be >= 1, got {e.batch_prompts}")
    _require(e.max_prompts is None or e.max_prompts >= 1, "eval.max_prompts", f"must be >= 1, got {e.max_prompts}")
    _require(e.temperature is None or e.temperature > 0, "eval.temperature", f"must be > 0, got {e.temperature}")
    _require(e.max_new_tokens is None or e.max_new_tokens >= 1, "eval.max_new_tokens",
             f"must be >= 1, got {e.max_new_tokens}")
    c = cfg.checkpoint
    _choice(c.best_mode, "checkpoint.best_mode", ("max", "min"))
    if c.best_metric is not None:
        _require(c.best_metric.startswith("eval/"), "checkpoint.best_metric",
                 f"must be an evaluation metric such as eval/pass@1 or eval/reward_mean, got {c.best_metric!r}")
        _require(e.every > 0, "checkpoint.best_metric", "ranks evaluations: needs eval.every > 0")


def _check_rollout(cfg: TrainConfig) -> None:
    r = cfg.rollout
    _require(r.n >= 1, "rollout.n", f"must be >= 1, got {r.n}")
    _require(r.max_new_tokens >= 1, "rollout.max_new_tokens", f"must be >= 1, got {r.max_new_tokens}")
    _require(r.temperature > 0, "rollout.temperature", f"must be > 0, got {r.temperature}")
    _require(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    _require(0 <= r.min_p < 1, "rollout.min_p", f"must be in [0, 1), got {r.min_p}")
    _require(r.top_k >= 0, "rollout.top_k", f"must be >= 0 (0 disables), got {r.top_k}")
    _choice(r.consistency, "rollout.consistency", CONSISTENCY)
    _require(r.sampler_devices >= 0, "rollout.sampler_devices", f"must be >= 0, got {r.sampler_devices}")
    _require(r.compact_rows is None or r.compact_rows >= 0, "rollout.compact_rows",
             f"must be >= 0 (0 disables), got {r.compact_rows}")
    _require(r.sampler_lag >= 0, "rollout.sampler_lag", f"must be >= 0, got {r.sampler_lag}")
    _require(not r.sampler_lag or not (r.async_rollout or r.sampler_devices), "rollout.sampler_lag",
             "a lagging sampler is synchronous on the trainer's devices; set rollout.async_rollout=false and "
             "rollout.sampler_devices=0")
    if r.consistency == "exact":  # settings exact consistency cannot have
        for value, key, why in (
                (r.sampler_lag, "rollout.sampler_lag",
                 "exact consistency needs the sampler's weights to be the trainer's; a lagging sampler needs "
                 "rollout.consistency=default"),
                (r.compact_rows and cfg.algorithm.dynamic_sampling, "rollout.compact_rows",
                 "exact consistency with algorithm.dynamic_sampling decodes rows drawn from several rounds, which "
                 "compact on another schedule than in their round: leave rollout.compact_rows unset (0 then)"),
                (r.async_rollout, "rollout.async_rollout",
                 "exact consistency needs the sampler's weights to be the trainer's; async rollouts are one step "
                 "stale (use rollout.consistency=default, and algorithm.rollout_is to correct the staleness)"),
                (r.sampler_devices, "rollout.sampler_devices",
                 "exact consistency is checked on one set of devices; disaggregated sampling needs "
                 "rollout.consistency=default")):
            _require(not value, key, why)
    if r.sampler_dtype is not None:
        _choice(r.sampler_dtype, "rollout.sampler_dtype", DTYPES)
        _require(r.consistency == "default" or r.sampler_dtype == cfg.model.dtype, "rollout.sampler_dtype",
                 f"{r.sampler_dtype} differs from model.dtype={cfg.model.dtype}, which needs "
                 "rollout.consistency=default (exact consistency samples with the trainer's numerics)")


def _check_algorithm(cfg: TrainConfig) -> None:
    a, r = cfg.algorithm, cfg.rollout
    _choice(a.policy_loss, "algorithm.policy_loss", POLICY_LOSSES)
    _choice(a.loss_agg, "algorithm.loss_agg", AGG_MODES)
    _choice(a.advantage, "algorithm.advantage", ADVANTAGES)
    _choice(a.kl_estimator, "algorithm.kl_estimator", KL_ESTIMATORS)
    if a.policy_loss in CLIPPED_LOSSES:
        # CISPO clips an importance weight, not a surrogate: clip_low = 1 (no lower bound) is its usual setting
        low_max_ok = a.clip_low <= 1 if a.policy_loss == "cispo" else a.clip_low < 1
        _require(a.clip_low >= 0 and low_max_ok, "algorithm.clip_low",
                 f"must be in [0, 1{']' if a.policy_loss == 'cispo' else ')'} for {a.policy_loss}, got {a.clip_low}")
        _require(a.clip_high >= 0, "algorithm.clip_high", f"must be >= 0, got {a.clip_high}")
    if a.dual_clip is not None:
        _require(a.dual_clip > 1, "algorithm.dual_clip", f"must be > 1 or null, got {a.dual_clip}")
        _require(a.policy_loss == "ppo_clip", "algorithm.dual_clip",
                 f"only applies to policy_loss=ppo_clip, not {a.policy_loss}; set it to null")
    _require(a.agg_constant is None or a.agg_constant > 0, "algorithm.agg_constant",
             f"must be > 0 or null, got {a.agg_constant}")
    _require(math.isfinite(a.kl_coef) and a.kl_coef >= 0, "algorithm.kl_coef", f"must be >= 0, got {a.kl_coef}")
    _require(not a.kl_in_reward or a.kl_coef > 0, "algorithm.kl_in_reward",
             "needs algorithm.kl_coef > 0 (with kl_coef = 0 there is no KL term to move into the reward)")
    _require(a.entropy_coef >= 0, "algorithm.entropy_coef", f"must be >= 0, got {a.entropy_coef}")
    _require(a.ppo_epochs >= 1, "algorithm.ppo_epochs", f"must be >= 1, got {a.ppo_epochs}")
    _require(a.minibatches >= 1, "algorithm.minibatches", f"must be >= 1, got {a.minibatches}")
    _choice(a.old_logp, "algorithm.old_logp", ("auto", "score"))
    _require(a.max_sampling_tries >= 1, "algorithm.max_sampling_tries", f"must be >= 1, got {a.max_sampling_tries}")
    if a.overlong_penalty:
        _require(0 < a.overlong_cache <= r.max_new_tokens, "algorithm.overlong_cache",
                 f"must be in (0, rollout.max_new_tokens={r.max_new_tokens}], got {a.overlong_cache}")
    _require(0 <= a.gamma <= 1, "algorithm.gamma", f"must be in [0, 1], got {a.gamma}")
    _require(0 <= a.lam <= 1, "algorithm.lam", f"must be in [0, 1], got {a.lam}")
    _require(a.critic_lr is None or a.critic_lr > 0, "algorithm.critic_lr", f"must be > 0 or null, got {a.critic_lr}")
    _require(a.value_clip is None or a.value_clip > 0, "algorithm.value_clip",
             f"must be > 0 or null, got {a.value_clip}")
    if a.critic is not None:
        _choice(a.critic, "algorithm.critic", CRITICS)
    if a.advantage == "gae":
        _require(a.critic is not None, "algorithm.critic",
                 f"advantage=gae needs a value model: set algorithm.critic to one of {', '.join(CRITICS)}")
    else:
        _require(a.critic is None, "algorithm.critic",
                 f"only used by advantage=gae (advantage={a.advantage} needs no value model); set it to null")
    if a.advantage in GROUP_ADVANTAGES:
        # a group of one has no baseline: every advantage would be 0 and nothing would be learned
        _require(r.n >= 2, "rollout.n", f"advantage={a.advantage} compares samples of a prompt: needs n >= 2")
    if a.advantage == "passk":
        _require(1 <= a.passk_k <= r.n, "algorithm.passk_k", f"must be in [1, rollout.n={r.n}], got {a.passk_k}")
    if a.dynamic_sampling:
        _require(r.n >= 2, "rollout.n", "algorithm.dynamic_sampling keeps groups whose rewards differ: needs n >= 2")
    _check_remedies(cfg)


def _check_remedies(cfg: TrainConfig) -> None:
    a = cfg.algorithm
    if a.entropy_target is not None:
        _require(a.entropy_target > 0, "algorithm.entropy_target", f"must be > 0 or null, got {a.entropy_target}")
        _require(a.entropy_coef_step > 0, "algorithm.entropy_coef_step", f"must be > 0, got {a.entropy_coef_step}")
        _require(a.entropy_coef_max >= a.entropy_coef, "algorithm.entropy_coef_max",
                 f"must be >= algorithm.entropy_coef={a.entropy_coef}, got {a.entropy_coef_max}")
    _require(0 < a.entropy_token_frac <= 1, "algorithm.entropy_token_frac",
             f"must be in (0, 1], got {a.entropy_token_frac}")
    _choice(a.cov_penalty, "algorithm.cov_penalty", COV_PENALTIES)
    _require(0 < a.clip_cov_ratio <= 1, "algorithm.clip_cov_ratio", f"must be in (0, 1], got {a.clip_cov_ratio}")
    _require(a.clip_cov_low < a.clip_cov_high, "algorithm.clip_cov_high",
             f"must be > algorithm.clip_cov_low={a.clip_cov_low}, got {a.clip_cov_high}")
    _require(0 < a.kl_cov_ratio <= 1, "algorithm.kl_cov_ratio", f"must be in (0, 1], got {a.kl_cov_ratio}")
    _require(a.kl_cov_coef >= 0, "algorithm.kl_cov_coef", f"must be >= 0, got {a.kl_cov_coef}")
    if a.cov_penalty == "clip_cov":
        _require(a.policy_loss in CLIPPED_LOSSES, "algorithm.cov_penalty",
                 f"clip_cov works with a clipped policy loss ({', '.join(CLIPPED_LOSSES)}), not {a.policy_loss}")
    _require(a.ds_gamma_pos >= 0, "algorithm.ds_gamma_pos", f"must be >= 0, got {a.ds_gamma_pos}")
    _require(a.ds_gamma_neg >= 0, "algorithm.ds_gamma_neg", f"must be >= 0, got {a.ds_gamma_neg}")
    if a.ds_gamma_pos or a.ds_gamma_neg:
        _require(a.advantage in GROUP_ADVANTAGES, "algorithm.ds_gamma_pos",
                 f"Differential Smoothing modifies sequence advantages: needs a group advantage "
                 f"({', '.join(GROUP_ADVANTAGES)}), not {a.advantage}")
    _require(a.bupo_steps >= 0, "algorithm.bupo_steps", f"must be >= 0, got {a.bupo_steps}")
    if a.bupo_steps:
        _require(a.bupo_layer is not None and a.bupo_layer >= 0, "algorithm.bupo_layer",
                 "algorithm.bupo_steps > 0 needs the layer whose policy is optimised (a 0-based index)")
        _require(a.advantage != "gae", "algorithm.bupo_steps", "the BuPO warm-up is not combined with a critic")
    _choice(a.rollout_is, "algorithm.rollout_is", ROLLOUT_IS)
    _choice(a.rollout_mask, "algorithm.rollout_mask", ROLLOUT_MASK)
    _require(a.rollout_is_cap >= 1, "algorithm.rollout_is_cap", f"must be >= 1, got {a.rollout_is_cap}")
    _require(0 <= a.rollout_mask_low < 1 < a.rollout_mask_high, "algorithm.rollout_mask_low",
             f"the band must satisfy 0 <= low < 1 < high, got [{a.rollout_mask_low}, {a.rollout_mask_high}]")


def _row_axes(cfg: TrainConfig) -> list[str]:
    """The mesh axes that split rows of batches: the ``batch`` rule (default ``data`` and ``fsdp``)."""
    target = cfg.mesh.rules.get("batch", ["data", "fsdp"])
    return [target] if isinstance(target, str) else list(target or [])


def _data_parallel_size(cfg: TrainConfig, sizes: dict[str, int], device_count: int) -> int:
    fixed = math.prod(v for v in sizes.values() if v != -1)
    filled = {k: (device_count // fixed if v == -1 else v) for k, v in sizes.items()}
    return math.prod(filled[a] for a in _row_axes(cfg))


def _check_train(cfg: TrainConfig, device_count: int | None) -> None:
    a, r, t = cfg.algorithm, cfg.rollout, cfg.train
    _require(t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
    _require(t.prompts_per_step >= 1, "train.prompts_per_step", f"must be >= 1, got {t.prompts_per_step}")
    rows = t.prompts_per_step * r.n
    _require(rows % a.minibatches == 0, "algorithm.minibatches",
             f"{rows} responses per step (train.prompts_per_step={t.prompts_per_step} x rollout.n={r.n}) do not "
             f"split into {a.minibatches} equal minibatches")
    # exact consistency's update decodes the whole batch as sampled, masking out the other minibatches' responses
    mb = rows if r.consistency == "exact" else rows // a.minibatches
    _require(t.micro_batch_size >= 1 and mb % t.micro_batch_size == 0, "train.micro_batch_size",
             f"a minibatch of {mb} responses does not split into micro-batches of {t.micro_batch_size}")
    _require(t.lr > 0 and math.isfinite(t.lr), "train.lr", f"must be > 0, got {t.lr}")
    updates = t.steps * a.ppo_epochs * a.minibatches
    _require(0 <= t.warmup_steps <= updates, "train.warmup_steps",
             f"must be in [0, {updates}] (the run makes train.steps x algorithm.ppo_epochs x algorithm.minibatches "
             f"= {updates} optimizer updates), got {t.warmup_steps}")
    _choice(t.schedule, "train.schedule", SCHEDULES)
    _require(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _require(0 <= t.b1 < 1, "train.b1", f"must be in [0, 1), got {t.b1}")
    _require(0 <= t.b2 < 1, "train.b2", f"must be in [0, 1), got {t.b2}")
    _require(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (0 disables clipping), got {t.grad_clip}")
    _require(t.logprob_chunk >= 1, "train.logprob_chunk", f"must be >= 1, got {t.logprob_chunk}")

    sizes = mesh_sizes(cfg)
    for axis, size in sizes.items():
        _require(size == -1 or size >= 1, f"mesh.{axis}", f"must be >= 1 or -1 (fill), got {size}")
    for name, target in cfg.mesh.rules.items():
        _choice(name, "mesh.rules", LOGICAL_AXES)
        targets = [target] if isinstance(target, str) else list(target or [])
        for axis in targets:
            _choice(axis, f"mesh.rules.{name}", MESH_AXES)
    filled = [axis for axis, size in sizes.items() if size == -1]
    _require(len(filled) <= 1, f"mesh.{filled[-1] if filled else ''}",
             f"at most one mesh axis may be -1, got {', '.join(filled)}")
    if device_count is not None:
        fixed = math.prod(v for v in sizes.values() if v != -1)
        ok = device_count % fixed == 0 if filled else fixed == device_count
        _require(ok, "mesh", f"{sizes} does not match the {device_count} available devices")
        dp = _data_parallel_size(cfg, sizes, device_count)
        _require(t.micro_batch_size % dp == 0, "train.micro_batch_size",
                 f"{t.micro_batch_size} is not divisible by the data-parallel size {dp} (the mesh axes "
                 f"{' x '.join(_row_axes(cfg)) or 'none'} that split rows)")


def _check_rest(cfg: TrainConfig) -> None:
    c = cfg.checkpoint
    _require(c.keep >= 1, "checkpoint.keep", f"must be >= 1, got {c.keep}")
    _require(c.every >= 0, "checkpoint.every", f"must be >= 0 (0: only at the end), got {c.every}")
    _require(c.every_minutes >= 0, "checkpoint.every_minutes", f"must be >= 0 (0: off), got {c.every_minutes}")
    t = cfg.train
    _require(t.halt_nonfinite_steps >= 0, "train.halt_nonfinite_steps", f"must be >= 0, got {t.halt_nonfinite_steps}")
    _require(t.halt_weight_jump >= 0, "train.halt_weight_jump", f"must be >= 0 (0: off), got {t.halt_weight_jump}")
    _require(bool(cfg.log.run_dir), "log.run_dir", "must name a directory")
    peak = cfg.log.peak_tflops
    _require(peak is None or peak > 0, "log.peak_tflops", f"must be > 0 TFLOP/s per device, got {peak}")
    fns = cfg.reward.fns
    _require(len(fns) >= 1, "reward.fns", "at least one reward function is needed")
    rw = cfg.reward
    _require(rw.timeout > 0, "reward.timeout", f"must be > 0 seconds, got {rw.timeout}")
    _require(rw.workers is None or rw.workers >= 1, "reward.workers", f"must be >= 1 or null, got {rw.workers}")
    _require(0 < rw.max_failure_frac <= 1, "reward.max_failure_frac", f"must be in (0, 1], got {rw.max_failure_frac}")
    _require(rw.failure_window >= 1, "reward.failure_window", f"must be >= 1, got {rw.failure_window}")
    from jaxrl_llm.rewards import REWARDS  # light: numpy only

    for i, spec in enumerate(fns):
        key = f"reward.fns[{i}]"
        _require(bool(spec.name), f"{key}.name", "must name a reward")
        if ":" not in spec.name:  # module:function rewards are imported when the trainer builds them
            _choice(spec.name, f"{key}.name", sorted(REWARDS))
        _require(math.isfinite(spec.weight), f"{key}.weight", f"must be finite, got {spec.weight}")
    names = [spec.name for spec in fns]
    dup = sorted({n for n in names if names.count(n) > 1})
    _require(not dup, "reward.fns", f"each reward may appear once (metrics are per name), repeated: {dup}")


def validate(cfg: TrainConfig, *, device_count: int | None = None) -> TrainConfig:
    """Cross-field checks; raises :class:`ConfigError` naming the key. ``device_count`` (when known) also checks
    the mesh against the devices and the micro-batch against the data-parallel size. Returns ``cfg``."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"validate expects a TrainConfig, got {type(cfg).__name__}")
    _check_model_data(cfg)
    _check_rollout(cfg)
    _check_algorithm(cfg)
    _check_train(cfg, device_count)
    _check_rest(cfg)
    _check_eval(cfg)
    return cfg
