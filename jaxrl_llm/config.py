"""Typed run configuration: dataclasses, YAML files with inheritance, and ``key=value`` overrides (OmegaConf).

Merge order, later wins::

    dataclass defaults  <-  YAML file(s)  <-  command-line overrides ``section.key=value``

A YAML file may inherit from presets with ``base: grpo.yaml`` or ``defaults: [grpo.yaml, small.yaml]`` (paths
relative to the file itself; listed files are merged in order, then the file's own keys). Override values are
parsed as YAML (``3`` is an int, ``1e-3`` a float, ``null`` is None, ``[1, 2]`` a list, ``{a: 1}`` a mapping);
list items are addressed as ``reward.fns[0].weight=2``.

Unknown keys and ill-typed values are rejected naming the dotted key (with close matches suggested); then
:func:`validate` checks cross-field consistency (batch sizes that must divide, clip bounds, known names) and
again names the offending key. The structural typing is OmegaConf's; the choices and cross-field rules live here.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from jaxrl_llm.errors import UserError

__all__ = [
    "TrainConfig", "ModelSection", "DataSection", "RolloutSection", "AlgorithmSection", "TrainSection",
    "MeshSection", "CheckpointSection", "LogSection", "RewardSpec", "RewardSection", "EvalSection",
    "EvalDataSection", "ConfigError", "load_config", "validate", "to_yaml", "to_dict", "save_config", "summary",
    "config_keys", "mesh_sizes", "TRUNCATE",
    "POLICY_LOSSES", "AGG_MODES", "KL_ESTIMATORS", "ADVANTAGES", "GROUP_ADVANTAGES", "CRITICS", "DTYPES",
    "REMAT", "ATTENTION", "SOURCES", "TASKS", "SCHEDULES", "CONSISTENCY", "COV_PENALTIES", "ROLLOUT_IS",
    "ROLLOUT_MASK", "MESH_AXES", "LOGICAL_AXES",
]

# Allowed names. They mirror the loss/advantage libraries but are kept here so that reading a config needs
# neither JAX nor the model code.
POLICY_LOSSES = ("ppo_clip", "gspo", "gspo_token", "cispo", "pg")
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3", "k3+")
GROUP_ADVANTAGES = ("grpo", "drgrpo", "rloo", "reinforce_pp_baseline", "passk")  # baselines from the n samples
ADVANTAGES = GROUP_ADVANTAGES + ("reinforce_pp", "gae")
CRITICS = ("separate",)  # a separate value model: a trunk initialised from the policy plus a linear value head
DTYPES = ("float32", "bfloat16")
REMAT = ("auto", "none", "full", "dots")
ATTENTION = ("auto", "dense", "blockwise", "cudnn", "splash")  # jaxrl_llm.models.attention.KERNELS
SOURCES = ("task", "gym", "jsonl", "parquet", "hf_disk")
TRUNCATE = ("error", "left", "right")  # a prompt longer than data.max_prompt_tokens: error, or cut on that side
TASKS = ("arith",)
SCHEDULES = ("constant", "cosine", "linear")
CONSISTENCY = ("default", "exact")
COV_PENALTIES = ("none", "clip_cov", "kl_cov")
ROLLOUT_IS = ("none", "token", "sequence")
ROLLOUT_MASK = ("none", "token", "sequence", "geometric")
MESH_AXES = ("data", "fsdp", "tensor", "expert")
LOGICAL_AXES = ("batch", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "experts")  # of mesh.rules
_CLIPPED_LOSSES = ("ppo_clip", "gspo", "gspo_token", "cispo")


class ConfigError(UserError):
    """A configuration problem; the message starts with or names the dotted key."""


# ---------------------------------------------------------------------------------------------------------------
# schema


@dataclass
class ModelSection:
    """The policy: a Hugging Face checkpoint directory (config.json, safetensors, tokenizer files), local or a URI
    (gs://, s3://, ...: copied once into a local cache, see jaxrl_llm.paths)."""

    path: str = MISSING  # required
    cache_dir: str | None = None  # local copies of URI checkpoints (None: $JAXRL_CACHE_DIR/models or ~/.cache/...)
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    param_dtype: str = "float32"  # storage dtype of the trained parameters
    # activation rematerialisation per layer: auto | none | full | dots (auto: full from 8,192 response tokens on,
    # where the activations kept for the backward pass outgrow the weights; none below)
    remat: str = "auto"
    # attention kernel: auto | dense | blockwise | cudnn (NVIDIA GPUs) | splash (TPUs). auto: splash on TPUs,
    # cuDNN on GPUs where it needs no [T, S] mask, else blockwise; on CPUs dense up to 256 keys, then blockwise
    attention: str = "auto"


@dataclass
class DataSection:
    """Where prompts come from. Rows carry ``prompt`` (or ``messages``) and ``answer``; other columns reach the
    reward functions."""

    source: str = "task"  # task (generated problems) | gym (reasoning-gym) | jsonl | parquet | hf_disk
    # source=jsonl (.jsonl, .json, .jsonl.gz) / parquet / hf_disk (datasets' save_to_disk): a file, a directory of
    # them or a glob pattern; local or a URI (gs://, s3://, file://, ...)
    path: str | None = None
    split: str = "train"  # source=hf_disk: the split of a saved DatasetDict
    task: str = "arith"  # generated task name for source=task; the reasoning-gym dataset for source=gym
    task_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {num_problems: 20000, difficulties: [1, 2]}
    prompt_key: str = "prompt"  # column holding the prompt text (a list of turns there counts as messages)
    messages_key: str = "messages"  # column holding chat turns [{role, content}], used when a row has no prompt
    answer_key: str = "answer"  # column holding the reference answer
    chat_template: bool = False  # render prompts with the tokenizer's chat template (messages always are)
    system_prompt: str | None = None  # a system turn put before every conversation that has none (chat template)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {enable_thinking: false} for Qwen3
    # prompts are left-padded to this many tokens; null: the longest prompt of the data, rounded up to 16
    max_prompt_tokens: int | None = None
    truncate: str = "error"  # a longer prompt: error (naming file and line) | left (keep its end) | right (its start)
    validate: bool = True  # read and tokenize every prompt at start (errors name file and line)
    shuffle: bool = True  # seeded shuffle over the whole data set, reshuffled every epoch
    seed: int = 0  # shuffle seed (and generated-task seed)
    read_threads: int = 8  # threads reading rows ahead of the sampler
    prefetch_batches: int = 2  # batches read ahead
    cache_dir: str | None = None  # local cache of decompressed .gz files (None: $JAXRL_CACHE_DIR/data or ~/.cache)


@dataclass
class EvalDataSection(DataSection):
    """A held-out prompt set, like the data section (``source: none`` when evaluating on ``eval.split``)."""

    source: str = "none"
    shuffle: bool = False


@dataclass
class EvalSection:
    """Evaluation during training on held-out prompts, scored by the run's reward functions."""

    every: int = 0  # steps between evaluations (0: none); the last step is evaluated too
    at_start: bool = False  # also evaluate the initial policy (step 0)
    data: EvalDataSection = field(default_factory=EvalDataSection)  # the held-out set ...
    split: float | None = None  # ... or held out of the training data: a fraction (< 1) or a number of rows
    max_prompts: int | None = None  # evaluate at most this many prompts (None: all of them)
    n: int = 4  # samples per prompt (pass@k for k <= n)
    temperature: float | None = None  # None: rollout.temperature
    max_new_tokens: int | None = None  # None: rollout.max_new_tokens
    batch_prompts: int = 16  # prompts per sampler call
    seed: int = 0  # sampling seed of evaluations (independent of training)


@dataclass
class RolloutSection:
    """Sampling of completions."""

    n: int = 8  # samples per prompt (the group size)
    max_new_tokens: int = 64  # generation budget; also DAPO's L_max for the overlong penalty
    temperature: float = 1.0
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    min_p: float = 0.0  # 0 disables
    consistency: str = "default"  # default | exact (sampler log-probs bitwise equal to the trainer's)
    sampler_dtype: str | None = None  # e.g. bfloat16 to sample in lower precision than model.dtype
    routing_replay: bool = False  # MoE: the trainer replays the experts the sampler chose for every token
    sampler_devices: int = 0  # > 0: disaggregated, the last N devices sample and the others train
    async_rollout: bool = False  # sample step k+1 while step k trains (one step off-policy)
    # halve the decode batch whenever at most half its rows still generate, down to this many rows (0: off;
    # None: 8, or 0 with consistency=exact)
    compact_rows: int | None = None


@dataclass
class AlgorithmSection:
    """Loss, advantage estimator and their knobs (a preset file sets a consistent group of these)."""

    name: str = "grpo"  # label of the preset (shown in logs)
    policy_loss: str = "ppo_clip"  # ppo_clip | gspo | gspo_token | cispo | pg
    loss_agg: str = "seq-mean-token-mean"  # see AGG_MODES
    agg_constant: float | None = None  # normaliser of seq-mean-token-sum-norm (None: rollout.max_new_tokens)
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2  # > clip_low is DAPO's clip-higher
    dual_clip: float | None = None  # ppo_clip only: bound c > 1 on the loss of negative-advantage tokens
    advantage: str = "grpo"  # see ADVANTAGES; drgrpo is grpo without division by the group std
    passk_k: int = 4  # k for advantage=passk
    kl_coef: float = 0.0  # > 0 keeps a frozen reference model and penalises KL to it
    kl_estimator: str = "k3"  # k1 | k2 | k3 | k3+
    kl_in_reward: bool = False  # subtract kl_coef * KL from the reward instead of adding it to the loss
    entropy_coef: float = 0.0  # entropy bonus weight
    ppo_epochs: int = 1  # passes over each step's rollouts
    minibatches: int = 1  # optimizer updates per epoch (the step's responses are split into this many)
    # old log-probs: "auto" takes them from the update's own forward (stop-gradient) when the step makes a single
    # update on fresh rollouts and nothing else needs them first, saving a scoring pass; "score" always scores
    old_logp: str = "auto"
    dynamic_sampling: bool = False  # DAPO: keep only groups whose rewards differ, resampling to fill the batch
    max_sampling_tries: int = 4  # rollout rounds per step at most, with dynamic sampling
    overlong_penalty: bool = False  # DAPO soft overlong punishment (tokens), L_max = rollout.max_new_tokens
    overlong_cache: int = 16  # L_cache: tokens before L_max where the penalty starts
    gamma: float = 1.0  # discount (gae, reinforce_pp)
    lam: float = 1.0  # GAE lambda
    critic: str | None = None  # gae only: separate (own value model initialised from the policy + value head)
    critic_lr: float | None = None  # the critic's learning rate (None: train.lr)
    value_clip: float | None = 0.2  # value clipping around the old values (None: unclipped)
    # exploration remedies (docs/features.md)
    entropy_target: float | None = None  # adaptive entropy control: steer the bonus coefficient to this entropy
    entropy_coef_step: float = 0.005  # change of the coefficient per step under adaptive control
    entropy_coef_max: float = 0.05  # upper bound of the adaptive coefficient
    entropy_token_frac: float = 1.0  # < 1: only this top fraction of tokens by entropy gets policy gradient
    cov_penalty: str = "none"  # none | clip_cov | kl_cov (arXiv 2505.22617)
    clip_cov_ratio: float = 2e-4  # fraction of tokens Clip-Cov detaches
    clip_cov_low: float = 1.0  # covariance band Clip-Cov draws from
    clip_cov_high: float = 5.0
    kl_cov_ratio: float = 2e-3  # top fraction of tokens by covariance KL-Cov penalises
    kl_cov_coef: float = 1.0
    ds_gamma_pos: float = 0.0  # Differential Smoothing: A - g_pos * log pi_old(y) on correct samples
    ds_gamma_neg: float = 0.0  # and A + g_neg * log pi_old(y) on incorrect ones (arXiv 2511.19942)
    ds_length_norm: bool = False  # use the per-token mean log-prob instead of the sequence log-prob
    bupo_layer: int | None = None  # BuPO warm-up: optimise the policy read out after this layer (0-based)...
    bupo_steps: int = 0  # ... for this many steps, then the full model (arXiv 2512.19673)
    # training-inference mismatch correction with the sampler's log-probs
    rollout_is: str = "none"  # none | token | sequence: truncated importance weights pi_old / mu_old
    rollout_is_cap: float = 2.0  # truncation C of the weights
    rollout_mask: str = "none"  # none | token | sequence | geometric: reject tokens/sequences with extreme ratios
    rollout_mask_low: float = 0.5
    rollout_mask_high: float = 2.0


@dataclass
class TrainSection:
    """Optimisation. Batch sizes count responses (prompts x samples) unless the name says prompts."""

    steps: int = 20  # RL steps (one rollout round + ppo_epochs x minibatches updates each)
    prompts_per_step: int = 8  # prompts sampled per step; a step has prompts_per_step * rollout.n responses
    micro_batch_size: int = 16  # responses per gradient-accumulation micro-batch
    seed: int = 0  # PRNG seed of sampling and minibatch order
    lr: float = 1e-5
    warmup_steps: int = 0  # linear warm-up, in optimizer updates
    schedule: str = "constant"  # constant | cosine | linear (decay to 0 at the last update)
    weight_decay: float = 0.0
    b1: float = 0.9  # Adam beta1
    b2: float = 0.999  # Adam beta2
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    logprob_chunk: int = 512  # vocabulary chunk of the log-prob/entropy kernel
    # run each prompt once for its rollout.n samples (they share its keys/values): in scoring passes, and in
    # updates when algorithm.minibatches is 1 and micro_batch_size is a multiple of rollout.n
    share_prompts: bool = True
    # in updates that share prompts, pack each group's responses into fewer rows (less padding)
    pack_responses: bool = True
    # divergence guard (trainer/guard.py): stop after this many consecutive steps with an update skipped as
    # non-finite (0: never) ...
    halt_nonfinite_steps: int = 3
    # ... or at once when one step changes the weights' global norm by more than this fraction of it (0: never)
    halt_weight_jump: float = 1.0


@dataclass
class MeshSection:
    """Device mesh axis sizes; one of them may be -1 (all remaining devices). ``rules`` overrides entries of the
    logical-axis rules table (``jaxrl_llm.parallel.DEFAULT_RULES``), e.g. ``{batch: [data], mlp: [fsdp, tensor]}``."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    rules: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointSection:
    """Orbax checkpoints under ``<log.run_dir>/checkpoints``."""

    every: int = 0  # steps between checkpoints (0: only at the end)
    # and a checkpoint at the end of any step that ends this many minutes or more after the last one (0: off)
    every_minutes: float = 30.0
    keep: int = 3  # most recent checkpoints kept
    dir: str | None = None  # where checkpoints go (None: <log.run_dir>/checkpoints); local or gs://
    # also keep the checkpoint with the best value of this evaluation metric (e.g. eval/pass@1); every evaluation
    # step is then saved
    best_metric: str | None = None
    best_mode: str = "max"  # max | min
    async_save: bool = True  # write in the background
    # continue from the latest checkpoint in the run directory; false with checkpoints there is an error
    resume: bool = True
    # start afresh: delete the run directory's checkpoints, metrics, TensorBoard events and export first
    overwrite: bool = False
    export_hf: bool = True  # write the final policy as a Hugging Face checkpoint (<log.run_dir>/hf)


@dataclass
class LogSection:
    run_dir: str = "runs/default"  # run directory: config.yaml, metrics.jsonl, TensorBoard events, checkpoints
    jsonl: bool = True
    tensorboard: bool = True
    progress: bool = True  # progress bar on the terminal
    layer_entropy: bool = False  # log the entropy of every layer's read-out policy (logit lens) each step
    # peak TFLOP/s of one device for the MFU metric; default: the bf16 data-sheet figure of a known TPU/GPU (none
    # on CPU, where MFU is not logged)
    peak_tflops: float | None = None
    report: bool = True  # `jaxrl-llm train` writes plots and summary.md into <run_dir>/report at the end
    wandb: bool = False  # also log to Weights & Biases (pip install 'jaxrl_llm[wandb]')
    wandb_project: str | None = None
    wandb_entity: str | None = None


@dataclass
class RewardSpec:
    """One reward term: a registered reward name (or ``package.module:function``), its weight and arguments."""

    name: str = MISSING
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardSection:
    fns: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(name="task")])
    timeout: float = 10.0  # seconds a reward function may spend on one item; a timed-out item scores 0
    workers: int | None = None  # items scored at once (None: the CPU cores this process may use)
    # stop the run when a reward function fails (raises, times out) on more than this fraction of its items
    # over the last failure_window steps (1: never)
    max_failure_frac: float = 0.5
    failure_window: int = 3


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
    eval: EvalSection = field(default_factory=EvalSection)


# ---------------------------------------------------------------------------------------------------------------
# key names and suggestions


def _field_type(cls, name: str):
    return typing.get_type_hints(cls)[name]


def config_keys(cls=TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (list items as ``reward.fns[].name``)."""
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        out.append(key)
        tp = _field_type(cls, f.name)
        if dataclasses.is_dataclass(tp):
            out += config_keys(tp, key + ".")
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            out += config_keys(typing.get_args(tp)[0], key + "[].")
    return out


def _section_class(path: list[str]):
    """The dataclass addressed by a key path (list indices are skipped), or None when it is not a dataclass."""
    cls = TrainConfig
    for part in path:
        if not dataclasses.is_dataclass(cls) or part not in {f.name for f in dataclasses.fields(cls)}:
            return None
        tp = _field_type(cls, part)
        if typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        cls = tp
    return cls if dataclasses.is_dataclass(cls) else None


def _split_key(key: str) -> list[str]:
    return [p for p in re.split(r"[.\[\]]", key) if p and not p.isdigit()]


def _suggest(key: str) -> list[str]:
    """Close matches for an unknown dotted key: siblings of the last part first, then any key in the schema."""
    parts = _split_key(key)
    if not parts:
        return []
    prefix = key[: len(key) - len(parts[-1])] if key.endswith(parts[-1]) else ""
    cls = _section_class(parts[:-1])
    if cls is not None:
        names = [f.name for f in dataclasses.fields(cls)]
        close = difflib.get_close_matches(parts[-1], names, n=3, cutoff=0.6)
        if close:
            return [prefix + c for c in close]
    every = [k.replace("[]", "") for k in config_keys()]
    by_leaf = [k for k in every if k.rsplit(".", 1)[-1] == parts[-1]]
    return by_leaf[:3] or difflib.get_close_matches(key, every, n=3, cutoff=0.6)


def _explain(err: OmegaConfBaseException, where: str, key: str | None = None) -> ConfigError:
    """A :class:`ConfigError` naming the full dotted key of an OmegaConf error."""
    inner = str(getattr(err, "full_key", "") or getattr(err, "key", "") or "")
    if key and inner and not inner.startswith(key):
        full = f"{key}.{inner}" if not inner.startswith("[") else key + inner
    else:
        full = inner or key or "?"
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)) and "not in" in str(err):
        close = _suggest(full)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return ConfigError(f"unknown config key {full!r} in {where}{hint}")
    msg = str(getattr(err, "msg", err)).splitlines()[0]
    if isinstance(err, ValidationError):
        return ConfigError(f"invalid value for {full!r} in {where}: {msg}")
    return ConfigError(f"config error at {full!r} in {where}: {msg}")


# ---------------------------------------------------------------------------------------------------------------
# loading


def _as_list(value, key: str, path: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ConfigError(f"{key!r} in {path} must be a file name or a list of file names, got {value!r}")


def _read_yaml(path: str, seen: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """``[(file, mapping), ...]`` in merge order: inherited files (depth first) before the file itself."""
    path = os.path.abspath(path)
    if path in seen:
        chain = " -> ".join(os.path.basename(p) for p in seen + (path,))
        raise ConfigError(f"config inheritance cycle: {chain}")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level, got {type(data).__name__}")
    parents = _as_list(data.pop("base", None), "base", path) + _as_list(data.pop("defaults", None), "defaults", path)
    layers: list[tuple[str, dict]] = []
    for parent in parents:
        layers += _read_yaml(os.path.join(os.path.dirname(path), parent), seen + (path,))
    return layers + [(path, data)]


def _parse_override(text: str):
    if "=" not in text:
        raise ConfigError(f"overrides must look like section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or key.startswith(("+", "~", "-")):
        raise ConfigError(f"overrides must look like section.key=value, got {text!r}")
    try:  # OmegaConf's YAML reading of the value (it knows 1e-3 is a float)
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))["v"]
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        reason = getattr(err, "problem", None) or " ".join(str(err).split())  # yaml's problem, without the marks
        raise ConfigError(f"cannot parse the value of override {text!r} as YAML ({reason}); quote a string, "
                          "close brackets: key='[1, 2]'") from None
    return key, value


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Build a :class:`TrainConfig` from the defaults, an optional YAML file and ``key=value`` overrides,
    then :func:`validate` it. Raises :class:`ConfigError` naming the offending key."""
    cfg = OmegaConf.structured(TrainConfig)
    if path is not None:
        for file, layer in _read_yaml(path):
            try:
                cfg = OmegaConf.merge(cfg, layer)
            except OmegaConfBaseException as err:
                raise _explain(err, file) from None
    for text in overrides:
        key, value = _parse_override(text)
        if re.split(r"[.\[]", key)[0] not in {f.name for f in dataclasses.fields(TrainConfig)}:
            close = _suggest(key)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config key {key!r} in the command-line overrides{hint}")
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as err:
            raise _explain(err, "the command-line overrides", key) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing required config value(s): {', '.join(missing)}")
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise _explain(err, "the merged config") from None
    return validate(obj)


# ---------------------------------------------------------------------------------------------------------------
# validation


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
    if r.consistency == "exact":
        _require(not r.compact_rows, "rollout.compact_rows",
                 "exact consistency replays the full decode batch; compaction needs rollout.consistency=default")
        _require(not r.async_rollout, "rollout.async_rollout",
                 "exact consistency needs the sampler's weights to be the trainer's; async rollouts are one step "
                 "stale (use rollout.consistency=default, and algorithm.rollout_is to correct the staleness)")
        _require(not r.sampler_devices, "rollout.sampler_devices",
                 "exact consistency is checked on one set of devices; disaggregated sampling needs "
                 "rollout.consistency=default")
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
    if a.policy_loss in _CLIPPED_LOSSES:
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
        _require(a.policy_loss in _CLIPPED_LOSSES, "algorithm.cov_penalty",
                 f"clip_cov works with a clipped policy loss ({', '.join(_CLIPPED_LOSSES)}), not {a.policy_loss}")
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


def mesh_sizes(cfg: TrainConfig) -> dict[str, int]:
    """The mesh axis sizes of a run config (``mesh.*`` without the rules)."""
    return {f.name: getattr(cfg.mesh, f.name) for f in dataclasses.fields(MeshSection) if f.name != "rules"}


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
    mb = rows // a.minibatches
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


# ---------------------------------------------------------------------------------------------------------------
# output


def to_yaml(cfg: TrainConfig) -> str:
    """The full config as YAML; :func:`load_config` on it gives an equal config."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: TrainConfig) -> dict:
    """The full config as nested plain dicts (for trackers)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def save_config(cfg: TrainConfig, path: str) -> None:
    """Write :func:`to_yaml` to ``path``, a local path or a URI (parent directories are created)."""
    from jaxrl_llm import paths

    paths.write_text(path, to_yaml(cfg))


def summary(cfg: TrainConfig) -> str:
    """A few human-readable lines describing the run (for logs and the start of a run)."""
    a, r, t = cfg.algorithm, cfg.rollout, cfg.train
    rows = t.prompts_per_step * r.n
    clip = f"clip [{1 - a.clip_low:g}, {1 + a.clip_high:g}]" if a.policy_loss in _CLIPPED_LOSSES else "no clip"
    if a.dual_clip is not None:
        clip += f", dual {a.dual_clip:g}"
    kl = (f"KL {a.kl_estimator} x {a.kl_coef:g} {'in reward' if a.kl_in_reward else 'in loss'}"
          if a.kl_coef > 0 else "no KL")
    extras = [x for x, on in (("dynamic sampling", a.dynamic_sampling),
                              (f"overlong penalty (cache {a.overlong_cache})", a.overlong_penalty)) if on]
    data = (f"task {cfg.data.task}" if cfg.data.source == "task" else f"{cfg.data.source} {cfg.data.path}")
    rewards = " + ".join(f"{s.weight:g}*{s.name}" for s in cfg.reward.fns)
    lines = [
        f"{a.name}: {a.policy_loss} ({clip}), {a.loss_agg}, advantage {a.advantage}, {kl}"
        + (f", {', '.join(extras)}" if extras else ""),
        f"model {cfg.model.path} ({cfg.model.dtype}); data {data}; reward {rewards}",
        f"{t.steps} steps x {t.prompts_per_step} prompts x {r.n} samples = {rows} responses/step, "
        f"{a.ppo_epochs} epoch(s) x {a.minibatches} minibatch(es) of {rows // a.minibatches}, "
        f"micro-batch {t.micro_batch_size}, lr {t.lr:g} ({t.schedule}, warm-up {t.warmup_steps})",
        f"run dir {cfg.log.run_dir}",
    ]
    return "\n".join(lines)
