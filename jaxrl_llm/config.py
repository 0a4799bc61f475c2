"""Typed run configuration: dataclasses, YAML files with inheritance, and ``key=value`` overrides (OmegaConf).

Merge order: dataclass defaults <- YAML file (which may name a ``base:`` file, resolved relative to itself, merged
first) <- command-line overrides ``section.key=value``. Unknown keys and ill-typed values are rejected naming the
key (with close matches suggested); :func:`validate` then checks cross-field consistency (batch sizes that must
divide, clip bounds, known names), again naming the offending key.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

__all__ = ["TrainConfig", "ConfigError", "load_config", "validate", "to_yaml", "save_config"]

POLICY_LOSSES = ("ppo_clip", "gspo", "gspo_token", "cispo", "pg")
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3", "k3+")
ADVANTAGES = ("grpo", "drgrpo", "rloo", "reinforce_pp_baseline", "passk", "gae")
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A configuration problem; the message names the dotted key."""


@dataclass
class ModelSection:
    path: str = MISSING  # Hugging Face checkpoint directory (config.json, safetensors, tokenizer files)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"  # none | full | dots


@dataclass
class DataSection:
    source: str = "task"  # task | jsonl | parquet
    path: str | None = None  # file for jsonl/parquet
    task: str = "arith"  # generated task name (source=task)
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    chat_template: bool = False
    max_prompt_tokens: int = 64  # prompts are left-padded to this length; longer prompts are an error
    shuffle: bool = True
    seed: int = 0


@dataclass
class RolloutSection:
    n: int = 8  # samples per prompt (the group size)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    consistency: str = "default"  # default | exact
    sampler_dtype: str | None = None  # e.g. bfloat16 to sample in lower precision than the trainer


@dataclass
class AlgorithmSection:
    name: str = "grpo"  # label of the preset
    policy_loss: str = "ppo_clip"
    loss_agg: str = "seq-mean-token-mean"
    agg_constant: float | None = None  # seq-mean-token-sum-norm normaliser (default: max_new_tokens)
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    advantage: str = "grpo"
    passk_k: int = 4  # k for advantage=passk
    kl_coef: float = 0.0  # > 0 builds a frozen reference model
    kl_estimator: str = "k3"
    kl_in_reward: bool = False  # subtract kl_coef * KL from the reward instead of adding it to the loss
    entropy_coef: float = 0.0
    ppo_epochs: int = 1
    minibatches: int = 1  # optimizer updates per epoch
    dynamic_sampling: bool = False  # DAPO: keep only groups whose rewards differ
    max_sampling_tries: int = 4
    overlong_penalty: bool = False  # DAPO soft overlong punishment (in tokens)
    overlong_cache: int = 16  # tokens before max_new_tokens where the penalty starts
    gamma: float = 1.0
    lam: float = 1.0
    value_coef: float = 0.5
    value_clip: float = 0.2


@dataclass
class TrainSection:
    steps: int = 20
    prompts_per_step: int = 8
    micro_batch_size: int = 16  # rows (responses) per gradient-accumulation micro-batch
    seed: int = 0
    lr: float = 1e-5
    warmup_steps: int = 0
    schedule: str = "constant"
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: float = 1.0
    logprob_chunk: int = 512


@dataclass
class MeshSection:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1


@dataclass
class CheckpointSection:
    every: int = 0  # steps between checkpoints (0: only at the end)
    keep: int = 3
    async_save: bool = True
    resume: bool = True
    export_hf: bool = True  # write the final policy as a Hugging Face checkpoint


@dataclass
class LogSection:
    run_dir: str = "runs/default"
    jsonl: bool = True
    tensorboard: bool = True
    progress: bool = True


@dataclass
class RewardSpec:
    name: str = MISSING
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardSection:
    fns: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(name="task")])
    timeout: float = 10.0


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    train: TrainSection = field(default_factory=TrainSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    reward: RewardSection = field(default_factory=RewardSection)


def _read_yaml(path: str, seen: tuple[str, ...] = ()) -> list[dict]:
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"config inheritance cycle through {path}")
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    base = data.pop("base", None)
    layers: list[dict] = []
    if base:
        layers += _read_yaml(os.path.join(os.path.dirname(path), base), seen + (path,))
    return layers + [data]


def _all_keys(obj, prefix="") -> list[str]:
    out = []
    for f in dataclasses.fields(obj):
        key = f"{prefix}{f.name}"
        out.append(key)
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += _all_keys(value, key + ".")
    return out


def _explain(err: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        close = difflib.get_close_matches(key, _all_keys(TrainConfig()), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return ConfigError(f"unknown config key {key!r} in {where}{hint}")
    if isinstance(err, ValidationError):
        return ConfigError(f"invalid value for {key!r} in {where}: {str(err.msg).splitlines()[0]}")
    return ConfigError(f"config error at {key!r} in {where}: {err}")


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Build a :class:`TrainConfig` from defaults, an optional YAML file and ``key=value`` overrides."""
    cfg = OmegaConf.structured(TrainConfig)
    if path is not None:
        for layer in _read_yaml(path):
            try:
                cfg = OmegaConf.merge(cfg, layer)
            except OmegaConfBaseException as err:
                raise _explain(err, path) from None
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like section.key=value, got {bad}")
    if overrides:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as err:
            raise _explain(err, "the command-line overrides") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing required config value(s): {', '.join(missing)}")
    obj = OmegaConf.to_object(cfg)
    validate(obj)
    return obj


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


def _choice(value, key: str, allowed) -> None:
    _require(value in allowed, key, f"got {value!r}; allowed: {', '.join(map(str, allowed))}")


def validate(cfg: TrainConfig, *, device_count: int | None = None) -> TrainConfig:
    """Cross-field checks; raises :class:`ConfigError` naming the key."""
    a, r, t, d = cfg.algorithm, cfg.rollout, cfg.train, cfg.data
    _choice(cfg.model.dtype, "model.dtype", DTYPES)
    _choice(cfg.model.param_dtype, "model.param_dtype", DTYPES)
    _choice(cfg.model.remat, "model.remat", ("none", "full", "dots"))
    _choice(d.source, "data.source", ("task", "jsonl", "parquet"))
    _require(d.source == "task" or bool(d.path), "data.path", f"needed for data.source={d.source}")
    _require(d.max_prompt_tokens >= 1, "data.max_prompt_tokens", "must be >= 1")
    _require(r.n >= 1, "rollout.n", "must be >= 1")
    _require(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    _require(r.temperature > 0, "rollout.temperature", "must be > 0")
    _require(0 < r.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
    _require(0 <= r.min_p < 1, "rollout.min_p", "must be in [0, 1)")
    _require(r.top_k >= 0, "rollout.top_k", "must be >= 0")
    _choice(r.consistency, "rollout.consistency", ("default", "exact"))
    if r.sampler_dtype is not None:
        _choice(r.sampler_dtype, "rollout.sampler_dtype", DTYPES)
        _require(r.consistency == "default" or r.sampler_dtype == cfg.model.dtype, "rollout.sampler_dtype",
                 "a sampler precision different from the model's needs rollout.consistency=default")
    _choice(a.policy_loss, "algorithm.policy_loss", POLICY_LOSSES)
    _choice(a.loss_agg, "algorithm.loss_agg", AGG_MODES)
    _choice(a.advantage, "algorithm.advantage", ADVANTAGES)
    _choice(a.kl_estimator, "algorithm.kl_estimator", KL_ESTIMATORS)
    _require(0 <= a.clip_low <= 1, "algorithm.clip_low", f"must be in [0, 1], got {a.clip_low}")
    _require(a.clip_high >= 0, "algorithm.clip_high", f"must be >= 0, got {a.clip_high}")
    _require(a.dual_clip is None or a.dual_clip > 1, "algorithm.dual_clip", f"must be > 1 or null, got {a.dual_clip}")
    _require(a.kl_coef >= 0, "algorithm.kl_coef", "must be >= 0")
    _require(a.entropy_coef >= 0, "algorithm.entropy_coef", "must be >= 0")
    _require(a.ppo_epochs >= 1, "algorithm.ppo_epochs", "must be >= 1")
    _require(a.minibatches >= 1, "algorithm.minibatches", "must be >= 1")
    _require(a.max_sampling_tries >= 1, "algorithm.max_sampling_tries", "must be >= 1")
    _require(0 < a.overlong_cache <= r.max_new_tokens or not a.overlong_penalty, "algorithm.overlong_cache",
             f"must be in (0, rollout.max_new_tokens={r.max_new_tokens}]")
    _require(1 <= a.passk_k <= r.n or a.advantage != "passk", "algorithm.passk_k",
             f"must be in [1, rollout.n={r.n}]")
    _require(a.advantage != "rloo" or r.n >= 2, "rollout.n", "advantage=rloo needs at least 2 samples per prompt")
    _require(a.advantage != "gae", "algorithm.advantage",
             "gae needs a critic, which this trainer does not build yet; use grpo, drgrpo, rloo, "
             "reinforce_pp_baseline or passk")
    _require(t.steps >= 1, "train.steps", "must be >= 1")
    _require(t.prompts_per_step >= 1, "train.prompts_per_step", "must be >= 1")
    rows = t.prompts_per_step * r.n
    _require(rows % a.minibatches == 0, "algorithm.minibatches",
             f"{rows} responses per step (train.prompts_per_step x rollout.n) do not split into {a.minibatches} "
             "minibatches")
    mb = rows // a.minibatches
    _require(t.micro_batch_size >= 1 and mb % t.micro_batch_size == 0, "train.micro_batch_size",
             f"a minibatch of {mb} responses does not split into micro-batches of {t.micro_batch_size}")
    _require(t.lr > 0, "train.lr", "must be > 0")
    _require(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    _choice(t.schedule, "train.schedule", ("constant", "cosine", "linear"))
    _require(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
    _require(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    _require(cfg.checkpoint.every >= 0, "checkpoint.every", "must be >= 0")
    sizes = dataclasses.asdict(cfg.mesh)
    _require(sum(v == -1 for v in sizes.values()) <= 1, "mesh", "at most one axis may be -1")
    _require(all(v == -1 or v >= 1 for v in sizes.values()), "mesh", f"axis sizes must be >= 1 or -1, got {sizes}")
    if device_count is not None:
        fixed = 1
        for v in sizes.values():
            fixed *= v if v != -1 else 1
        ok = device_count % fixed == 0 if -1 in sizes.values() else fixed == device_count
        _require(ok, "mesh", f"{sizes} does not match the {device_count} available devices")
        dp = sizes["data"] if sizes["data"] != -1 else device_count // fixed
        dp *= sizes["fsdp"] if sizes["fsdp"] != -1 else device_count // fixed
        _require(t.micro_batch_size % dp == 0, "train.micro_batch_size",
                 f"{t.micro_batch_size} is not divisible by the data-parallel size {dp} (mesh.data x mesh.fsdp)")
    names = [spec.name for spec in cfg.reward.fns]
    _require(len(names) >= 1, "reward.fns", "at least one reward function is needed")
    _require(cfg.reward.timeout > 0, "reward.timeout", "must be > 0")
    return cfg


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: TrainConfig, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(to_yaml(cfg))
