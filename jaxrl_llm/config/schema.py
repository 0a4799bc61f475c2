"""The schema of a run config: one dataclass per section, their defaults and comments (the reference of every
setting), :class:`ConfigError` and :func:`mesh_sizes`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from jaxrl_llm.errors import UserError

__all__ = [
    "TrainConfig", "ModelSection", "DataSection", "RolloutSection", "AlgorithmSection", "TrainSection",
    "MeshSection", "CheckpointSection", "LogSection", "RewardSpec", "RewardSection", "EvalSection",
    "EvalDataSection", "ConfigError", "mesh_sizes",
]


class ConfigError(UserError):
    """A configuration problem; the message starts with or names the dotted key."""


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
    consistency: str = "default"  # default | exact (the update's log-probs are the sampler's, bit for bit)
    sampler_dtype: str | None = None  # e.g. bfloat16 to sample in lower precision than model.dtype
    routing_replay: bool = False  # MoE: the trainer replays the experts the sampler chose for every token
    sampler_devices: int = 0  # > 0: disaggregated, the last N devices sample and the others train
    async_rollout: bool = False  # sample step k+1 while step k trains (one step off-policy)
    # experiments: sample from the weights of this many steps before (an injected off-policy mismatch; the older
    # weights are not checkpointed, so a resumed run's first steps are less stale)
    sampler_lag: int = 0
    # halve the decode batch whenever at most half its rows still generate, down to this many rows (0: off;
    # None: 8, or 0 with consistency=exact and dynamic sampling)
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



def mesh_sizes(cfg: TrainConfig) -> dict[str, int]:
    """The mesh axis sizes of a run config (``mesh.*`` without the rules)."""
    return {f.name: getattr(cfg.mesh, f.name) for f in dataclasses.fields(MeshSection) if f.name != "rules"}
