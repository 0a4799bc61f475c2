"""Ahead-of-time memory planning: does an RL run fit in accelerator memory on a target mesh?

``jaxrl-llm plan`` builds the policy abstractly (``nnx.eval_shape``: no parameter is allocated), gives every
array a ``jax.ShapeDtypeStruct`` with the sharding the trainer would give it, and lowers and compiles the
trainer's three jitted programs ahead of time:

* the policy update (micro-batch gradient accumulation + AdamW), as :class:`jaxrl_llm.trainer.rl.RLTrainer` jits
  it (explicit in/out shardings, donated parameters and optimizer state);
* the sampler's generate loop (prefill + decode over the KV cache);
* the log-prob scoring pass over a whole step's rollouts (old and reference log-probs).

XLA's ``compiled.memory_analysis()`` of each program (arguments, outputs, aliases, temporaries, code) gives the
per-device peak of each phase of a step; state that stays resident but is not an argument of the program (the
frozen reference policy, the critic) is added. An analytic estimate is printed next to every figure.

Meshes larger than the local device count are compiled on fake CPU devices in a subprocess
(``JAX_PLATFORMS=cpu``, ``XLA_FLAGS=--xla_force_host_platform_device_count=N``): ``jax.sharding.AbstractMesh``
lowers but does not compile, and ``jax.experimental.topologies`` has no CPU topology. XLA:CPU's buffer assignment
approximates the TPU/GPU one (it neither fuses nor schedules alike, and may widen bfloat16 arithmetic), so the
figures are estimates of the accelerator's; on real devices (enough local ones) the same code measures the
accelerator's own compiler.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from typing import Any

GiB = 1024 ** 3

# HBM per chip/GPU, and the fraction JAX may use by default (on GPUs the allocator preallocates 75% of memory
# unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise)
ACCELERATORS: dict[str, tuple[int | None, float]] = {
    "tpu-v5e": (16 * GiB, 1.0),
    "tpu-v5p": (95 * GiB, 1.0),
    "tpu-v6e": (32 * GiB, 1.0),
    "h100": (80 * GiB, 0.75),
    "h200": (141 * GiB, 0.75),
    "a100-80g": (80 * GiB, 0.75),
    "cpu": (None, 1.0),  # host RAM, shared by the (fake) devices
}

_QWEN3 = dict(model_type="qwen3", vocab_size=151936, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6,
              rope_theta=1000000.0, max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645)
# Hugging Face configs of common models, for planning without a checkpoint on disk
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16,
                       tie_word_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16,
                       tie_word_embeddings=True),
    "qwen3-4b": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32,
                     tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
                     tie_word_embeddings=False),
}

_ITEMSIZE = {"float32": 4, "bfloat16": 2}
MESH_AXES = ("data", "fsdp", "tensor", "expert")  # as jaxrl_llm.parallel (not imported: it pulls in jax)

__all__ = ["ACCELERATORS", "MODEL_PRESETS", "PlanError", "ProgramMemory", "MemoryPlan", "Report", "parse_mesh",
           "resolve_mesh", "resolve_model", "load_plan_config", "analytic_plan", "compile_plan", "plan",
           "format_report", "run_cli"]


class PlanError(ValueError):
    """A planning request that cannot be answered (bad mesh, unknown accelerator or model, ...)."""


# ---------------------------------------------------------------------------------------------------------------
# inputs: mesh, accelerator, model, config


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=1,fsdp=8,tensor=8"`` -> a size for every mesh axis (axes not named are 1; one may be -1)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES:
            raise PlanError(f"--mesh: unknown axis {name!r} in {text!r}; axes are {', '.join(MESH_AXES)}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise PlanError(f"--mesh: {part!r} must look like axis=size (an integer)") from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise PlanError(f"--mesh: {name} must be >= 1 or -1 (fill), got {sizes[name]}")
    return sizes


def resolve_mesh(sizes: dict[str, int], devices: int | None, sampler_devices: int = 0) -> tuple[dict[str, int], int]:
    """Fill a -1 axis and check the mesh against the device count (of which ``sampler_devices`` sample on their
    own, outside the mesh); returns ``(sizes, mesh devices)``."""
    extra = f" + {sampler_devices} sampler devices (rollout.sampler_devices)" if sampler_devices else ""
    if devices is not None:
        devices -= sampler_devices
        if devices < 1:
            raise PlanError(f"--devices {devices + sampler_devices} leaves no device for the mesh{extra}")
    sizes = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    fill = [a for a, n in sizes.items() if n == -1]
    if len(fill) > 1:
        raise PlanError(f"mesh: at most one axis may be -1, got {', '.join(fill)}")
    fixed = math.prod(n for n in sizes.values() if n != -1)
    if fill:
        if devices is None:
            raise PlanError(f"mesh axis {fill[0]}=-1 fills the remaining devices: give --devices N")
        if devices % fixed:
            raise PlanError(f"mesh {mesh_text(sizes)} cannot fill {devices} devices{extra} ({devices} is not "
                            f"divisible by {fixed})")
        sizes[fill[0]] = devices // fixed
    total = math.prod(sizes.values())
    if devices is not None and devices != total:
        plus = " plus the sampler devices" if extra else ""
        raise PlanError(f"mesh {mesh_text(sizes)} has {total} devices{extra} but --devices is "
                        f"{devices + sampler_devices}; the product of the axis sizes{plus} must equal the device count")
    return sizes, total


def mesh_text(sizes: dict[str, int]) -> str:
    return ",".join(f"{a}={sizes[a]}" for a in MESH_AXES if a in sizes)


def accelerator_memory(name: str | None, devices: int) -> tuple[int | None, int | None]:
    """``(HBM bytes, bytes usable by JAX)`` per device of a named accelerator (``None`` without one)."""
    if name is None:
        return None, None
    if name not in ACCELERATORS:
        raise PlanError(f"unknown accelerator {name!r}; known: {', '.join(ACCELERATORS)}")
    hbm, fraction = ACCELERATORS[name]
    if hbm is None:  # cpu: the host's RAM shared by every (fake) device
        hbm = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // devices
    return hbm, int(hbm * fraction)


def resolve_model(spec: str | None):
    """A :class:`ModelConfig` from a preset name, a ``config.json`` file or a checkpoint directory."""
    from jaxrl_llm.models.config import ModelConfig

    if not spec:
        raise PlanError("no model: set model.path in the config or pass --model-config (a config.json, a "
                        f"checkpoint directory or a preset: {', '.join(MODEL_PRESETS)})")
    if spec.lower() in MODEL_PRESETS:
        return ModelConfig(**MODEL_PRESETS[spec.lower()])
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise PlanError(f"model {spec!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor a config.json file "
                        "nor a directory holding one")
    with open(path, encoding="utf-8") as f:
        try:
            return ModelConfig.from_hf(json.load(f))
        except (json.JSONDecodeError, KeyError, ValueError) as err:
            raise PlanError(f"cannot read a model config from {path}: {err}") from None


def load_plan_config(config: str | None, overrides, model: str | None, devices: int):
    """The run config with the model path filled in from ``--model-config``, validated for ``devices``."""
    from jaxrl_llm.config import ConfigError, load_config, validate

    overrides = list(overrides)
    if model and not any(o.split("=", 1)[0].strip() == "model.path" for o in overrides):
        overrides.insert(0, f"model.path={model}")
    try:
        return validate(load_config(config, overrides), device_count=devices)
    except ConfigError as err:
        raise PlanError(f"config: {err}") from None


# ---------------------------------------------------------------------------------------------------------------
# results


@dataclasses.dataclass
class ProgramMemory:
    """One compiled program's memory analysis, bytes per device."""

    argument: int = 0
    output: int = 0
    alias: int = 0  # outputs written into donated arguments
    temp: int = 0
    code: int = 0

    @property
    def peak(self) -> int:
        """Arguments, outputs that do not reuse an argument, temporaries and code live together."""
        return self.argument + self.output - self.alias + self.temp + self.code

    @classmethod
    def of(cls, compiled) -> "ProgramMemory":
        m = compiled.memory_analysis()
        return cls(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes, alias=m.alias_size_in_bytes,
                   temp=m.temp_size_in_bytes, code=m.generated_code_size_in_bytes)


@dataclasses.dataclass
class MemoryPlan:
    """Per-device bytes of one configuration; ``method`` is ``compiled`` or ``analytic``."""

    method: str
    params: int  # the policy's parameters
    opt_state: int  # AdamW moments (and step counts)
    ref_params: int = 0  # frozen reference policy (kl_coef > 0)
    critic: int = 0  # the critic's parameters and optimizer state (advantage=gae)
    batch: int = 0  # the update's micro-batch inputs
    update_temp: int = 0  # gradients, activations, optimizer temporaries
    update_rest: int = 0  # the update's outputs not aliased to inputs (metrics), generated code
    sampler_copy: int = 0  # async rollouts: the weights the next rollout samples from
    disaggregated: bool = False  # sampling runs on devices of its own (rollout.sampler_devices)
    kv_cache: int = 0  # the sampler's KV cache (analytic; inside sample_temp when compiled)
    sample_temp: int = 0  # sampler: KV cache, logits, decode activations
    sample_io: int = 0  # sampler: prompts in, rollout out, code (and its own weights when disaggregated)
    score_temp: int = 0  # scoring: forward activations and log-prob chunks over a whole step's rollouts
    score_io: int = 0
    seconds: float = 0.0  # compile time
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def resident(self) -> int:
        """What the trainer's devices hold throughout a step."""
        return self.params + self.opt_state + self.ref_params + self.critic + self.sampler_copy

    @property
    def phases(self) -> dict[str, int]:
        """Peak per phase; sampling on the sampler's own devices holds nothing of the trainer's."""
        sampling = self.sample_temp + self.sample_io + (0 if self.disaggregated else self.resident)
        return {"update": self.resident + self.batch + self.update_temp + self.update_rest, "sampling": sampling,
                "scoring": self.resident + self.score_temp + self.score_io}

    @property
    def total(self) -> int:
        return max(self.phases.values())

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"phases": self.phases, "total": self.total}

    @classmethod
    def from_json(cls, d: dict) -> "MemoryPlan":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------------------------------------------
# shapes of one step (shared by the analytic and compiled plans)


@dataclasses.dataclass(frozen=True)
class StepShapes:
    dp: int  # data-parallel size: mesh.data x mesh.fsdp
    prompt: int  # P: data.max_prompt_tokens
    response: int  # R: rollout.max_new_tokens (the trainer trims to the longest response: R is the worst case)
    rows: int  # responses per step: prompts_per_step x n
    micro: int  # rows per micro-batch
    num_micro: int  # micro-batches per minibatch


def step_shapes(cfg, sizes: dict[str, int]) -> StepShapes:
    rows = cfg.train.prompts_per_step * cfg.rollout.n
    minibatch = rows // cfg.algorithm.minibatches
    return StepShapes(dp=sizes["data"] * sizes["fsdp"], prompt=cfg.data.max_prompt_tokens,
                      response=cfg.rollout.max_new_tokens, rows=rows, micro=cfg.train.micro_batch_size,
                      num_micro=minibatch // cfg.train.micro_batch_size)


def _float_fields(cfg) -> int:
    """float32 ``[N, R]`` fields of the update's Experience: advantages, old and sampler log-probs, and the
    optional reference log-probs and rollout-correction weights."""
    a = cfg.algorithm
    kl_in_loss = a.kl_coef > 0 and not a.kl_in_reward
    return 3 + kl_in_loss + (a.rollout_is != "none" or a.rollout_mask != "none")


# ---------------------------------------------------------------------------------------------------------------
# analytic estimate


def _div(n: int, parts: int) -> int:
    """The size of one shard when ``parts`` divides ``n``, else ``n`` (the trainer then replicates)."""
    return n // parts if parts > 1 and n % parts == 0 else n


def analytic_plan(cfg, mc, sizes: dict[str, int]) -> MemoryPlan:
    """Formula estimate: parameters / shards, AdamW 2 x parameters, activations per token and layer, and
    KV cache = layers x 2 x rows x max_len x kv_heads x head_dim x bytes / shards."""
    pbytes, cbytes = _ITEMSIZE[cfg.model.param_dtype], _ITEMSIZE[cfg.model.dtype]
    sbytes = _ITEMSIZE[cfg.rollout.sampler_dtype or cfg.model.dtype]
    fsdp, tensor, expert = sizes["fsdp"], sizes["tensor"], sizes["expert"]
    s = step_shapes(cfg, sizes)
    expert_params = mc.num_moe_layers * 3 * mc.hidden_size * mc.moe_intermediate_size * mc.num_experts
    params = ((mc.num_params() - expert_params) * pbytes // (fsdp * tensor)
              + expert_params * pbytes // (fsdp * tensor * expert))
    opt = 2 * params  # mu and nu in the parameter dtype
    a = cfg.algorithm
    ref = params if a.kl_coef > 0 else 0
    critic = params + opt if a.advantage == "gae" else 0

    t = s.prompt + s.response
    micro_rows = max(s.micro // s.dp, 1)
    batch = s.num_micro * micro_rows * (5 * s.prompt + s.response * (5 + 4 * _float_fields(cfg)))
    # accumulated and current gradients, then AdamW's updates and new moments before the non-finite guard
    grads = 2 * params
    opt_tmp = opt + params
    acts = _train_activations(mc, cfg, micro_rows, t, tensor, cbytes)
    logprob = micro_rows * min(cfg.train.logprob_chunk, s.response) * mc.vocab_size * 4 * 3
    rows_dev = _div(s.rows, s.dp)
    k = cfg.rollout.sampler_devices  # disaggregated: k devices, each with all the weights and rows / k
    sample_rows = _div(s.rows, k) if k else rows_dev
    kv_heads = mc.num_kv_heads if k else _div(mc.num_kv_heads, tensor)
    kv = mc.num_layers * 2 * sample_rows * t * kv_heads * mc.head_dim * sbytes
    sample_weights = mc.num_params() * pbytes if k else params
    cast = sample_weights * sbytes // pbytes if sbytes != pbytes else 0  # weights cast to rollout.sampler_dtype
    sample_logits = sample_rows * mc.vocab_size * 4 * 4  # logits, scaled, filtered, probabilities
    score = _layer_forward(mc, rows_dev, t, tensor, cbytes) + rows_dev * min(cfg.train.logprob_chunk,
                                                                             s.response) * mc.vocab_size * 4 * 3
    return MemoryPlan(method="analytic", params=params, opt_state=opt, ref_params=ref, critic=critic, batch=batch,
                      sampler_copy=params if cfg.rollout.async_rollout and not k else 0, disaggregated=bool(k),
                      update_temp=grads + opt_tmp + acts + logprob, kv_cache=kv,
                      sample_temp=kv + sample_logits + cast, sample_io=sample_weights if k else 0,
                      score_temp=score)


def _token_layer_bytes(mc, tensor: int, cbytes: int) -> int:
    """Bytes per token one layer keeps for its backward pass (norms, q/k/v before and after rotary, attention
    output, MLP gate/up/product); heads and MLP columns are split over the tensor axis.

    A routed MoE layer (``models/moe.py``) holds no per-assignment activations: its backward pass recomputes them
    tile by tile. It keeps the router's float32 logits and probabilities, the k gate weights and experts, and the
    tile plan (two int32 per padded row, at most about 1.25 rows per assignment)."""
    d, hd = mc.hidden_size, mc.head_dim
    heads, kv = _div(mc.num_heads, tensor), _div(mc.num_kv_heads, tensor)
    if mc.is_moe:
        k = mc.num_experts_per_tok
        mlp = 4 * 2 * mc.num_experts + 8 * k + 10 * k
    else:
        mlp = cbytes * 3 * _div(mc.intermediate_size, tensor)
    return cbytes * (4 * d + (3 * heads + 4 * kv) * hd) + mlp + 4 * 2 * d  # + float32 norm statistics


def _layer_forward(mc, rows: int, t: int, tensor: int, cbytes: int) -> int:
    """One layer's activations for ``rows`` sequences of ``t`` tokens, with float32 attention scores."""
    heads = _div(mc.num_heads, tensor)
    return rows * t * _token_layer_bytes(mc, tensor, cbytes) + rows * heads * t * t * (4 + cbytes)


def _train_activations(mc, cfg, rows: int, t: int, tensor: int, cbytes: int) -> int:
    """Activations saved for the backward pass of one micro-batch, by remat policy."""
    layer = _layer_forward(mc, rows, t, tensor, cbytes)
    if cfg.model.remat == "full":  # only each layer's input is kept; one layer is recomputed at a time
        return mc.num_layers * rows * t * mc.hidden_size * cbytes + layer
    if cfg.model.remat == "dots":  # matmul outputs without batch dimensions are kept
        d, hd = mc.hidden_size, mc.head_dim
        kept = cbytes * (2 * d + (_div(mc.num_heads, tensor) + 2 * _div(mc.num_kv_heads, tensor)) * hd
                         + 2 * _div(mc.intermediate_size, tensor))
        return mc.num_layers * rows * t * kept + layer
    return mc.num_layers * layer


# ---------------------------------------------------------------------------------------------------------------
# compiled plan


def _shard_bytes(x) -> int:
    """Bytes of the shard of ``x`` (an abstract array with a sharding) held by one device."""
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return math.prod(shape) * x.dtype.itemsize


def _tree_bytes(tree) -> int:
    import jax

    return sum(_shard_bytes(x) for x in jax.tree.leaves(tree))


def _abstract(shape, dtype, sharding=None):
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _abstract_policy(cfg, mc, mesh):
    """``(graphdef, params, rest)`` of the policy as the trainer holds it: abstract arrays with the shardings
    :func:`jaxrl_llm.models.load_hf` gives them."""
    from flax import nnx

    import jax.numpy as jnp
    from jaxrl_llm.models import Decoder
    from jaxrl_llm.parallel import state_shardings

    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    model = nnx.eval_shape(lambda: Decoder(mc, rngs=nnx.Rngs(0), dtype=dtypes[cfg.model.dtype],
                                           param_dtype=dtypes[cfg.model.param_dtype], remat=cfg.model.remat))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    for state in (params, rest):
        shardings = dict(nnx.to_flat_state(state_shardings(state, mesh)))
        for path, var in nnx.to_flat_state(state):
            sharding = shardings[path]
            sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
            value = var.get_value()
            var.set_value(_abstract(value.shape, value.dtype, sharding))
    return model, graphdef, params, rest


def _abstract_opt_state(optimizer, params, mesh):
    """The optimizer state as the trainer places it (``opt_state_shardings``: moments sharded like their
    parameters, step counts replicated)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxrl_llm.trainer.optim import opt_state_shardings

    shapes = jax.eval_shape(optimizer.init, params)
    shardings = opt_state_shardings(optimizer, params, NamedSharding(mesh, P()))
    return jax.tree.map(lambda x, s: _abstract(x.shape, x.dtype, s), shapes, shardings)


def _micro_batches(cfg, mc, mesh, s: StepShapes):
    """The update's input: an Experience ``[num_micro, micro, ...]`` sharded over rows, as the trainer places it."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxrl_llm.trainer.packing import Packing, packed_rows, packed_rows_multiple, prompt_sharing
    from jaxrl_llm.trainer.step import Experience

    a = cfg.algorithm
    rows = NamedSharding(mesh, P(None, ("data", "fsdp")))
    lead = (s.num_micro, s.micro)
    f32 = lambda: _abstract(lead + (s.response,), jnp.float32, rows)  # noqa: E731
    fields = dict(prompt_ids=_abstract(lead + (s.prompt,), jnp.int32, rows),
                  prompt_mask=_abstract(lead + (s.prompt,), jnp.bool_, rows),
                  tokens=_abstract(lead + (s.response,), jnp.int32, rows),
                  mask=_abstract(lead + (s.response,), jnp.bool_, rows),
                  advantages=f32(), old_logp=f32(), sampler_logp=f32())
    if a.kl_coef > 0 and not a.kl_in_reward:
        fields["ref_logp"] = f32()
    if a.rollout_is != "none" or a.rollout_mask != "none":
        fields["is_weights"] = f32()
    if cfg.rollout.routing_replay:
        shape = (s.num_micro, mc.num_moe_layers, s.micro, s.prompt + s.response, mc.num_experts_per_tok)
        fields["forced_experts"] = _abstract(shape, jnp.int32, NamedSharding(mesh, P(None, None, ("data", "fsdp"))))
    if prompt_sharing(cfg).pack:  # packed responses, at the worst case: no two responses share a row
        packed = (s.num_micro, packed_rows(s.micro, packed_rows_multiple(s.dp, s.micro)))
        slots = lambda: _abstract(packed + (s.response,), jnp.int32, rows)  # noqa: E731
        fields["packing"] = Packing(src=slots(), offset=slots(), segment=slots(),
                                    group=_abstract(packed, jnp.int32, rows),
                                    back=_abstract(lead + (s.response,), jnp.int32, rows))
    names = {f.name for f in dataclasses.fields(Experience)}
    return Experience(**{k: v for k, v in fields.items() if k in names})


def _compile_update(cfg, mc, mesh, graphdef, params, rest, opt_state, optimizer, s: StepShapes):
    """The trainer's jitted policy update (``RLTrainer.__init__``), lowered and compiled on abstract inputs."""
    import jax
    import jax.numpy as jnp
    from jaxrl_llm.sampling import sequence_logprobs
    from jaxrl_llm.trainer.packing import prompt_sharing
    from jaxrl_llm.trainer.step import LossConfig, jit_update_step

    temperature, chunk = cfg.rollout.temperature, cfg.train.logprob_chunk
    group = prompt_sharing(cfg).update_group

    def logprob_fn(m, exp):
        return sequence_logprobs(m, exp.prompt_ids, exp.prompt_mask, exp.tokens, exp.mask, temperature=temperature,
                                 chunk=chunk, forced_experts=exp.forced_experts, group=group, packing=exp.packing)

    shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    param_sh, opt_sh, rest_sh = shardings(params), shardings(opt_state), shardings(rest)
    step = jit_update_step(graphdef, optimizer, LossConfig.of(cfg), logprob_fn, param_sh, rest_sh, opt_sh)
    micro = _micro_batches(cfg, mc, mesh, s)
    control = {"entropy_coef": _abstract((), jnp.float32), "key": jax.eval_shape(lambda: jax.random.key(0))}
    compiled = step.lower(params, rest, opt_state, micro, _abstract((), jnp.float32), control).compile()
    return ProgramMemory.of(compiled), _tree_bytes(micro)


def _rows_sharding(mesh, rows: int, axis: int = 0):
    """Where ``RLTrainer`` puts a row axis (``_place_rows``): over ``data x fsdp`` when the rows divide, else
    nowhere in particular (None: left to XLA)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    if rows % (mesh.shape["data"] * mesh.shape["fsdp"]):
        return None
    return NamedSharding(mesh, P(*([None] * axis), ("data", "fsdp")))


def _compile_generate(cfg, mc, model, state, mesh, s: StepShapes):
    """The sampler's jitted generate loop as ``RLTrainer._rollout`` calls it: the prompts split over the
    data-parallel devices of ``mesh`` (the trainer's, or the sampler's own in disaggregated mode). Returns its
    memory, the sampler and the shardings of the rollout it returns."""
    import jax
    import jax.numpy as jnp
    from jaxrl_llm.sampling import Sampler, SamplingParams

    r = cfg.rollout
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    sampler = Sampler(model, consistency=r.consistency, compute_dtype=dtypes[r.sampler_dtype] if r.sampler_dtype
                      else None, compact_rows=r.compact_rows)
    eos = mc.eos_token_id if isinstance(mc.eos_token_id, int) else 0
    params_ = SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, min_p=r.min_p,
                             max_new_tokens=r.max_new_tokens, n=r.n, stop_tokens=(eos,))
    b = cfg.train.prompts_per_step
    rows = _rows_sharding(mesh, b)
    args = (_abstract((b, s.prompt), jnp.int32, rows), _abstract((b, s.prompt), jnp.bool_, rows),
            jax.eval_shape(lambda: jax.random.key(0)), _abstract((s.rows, 1), jnp.int32),
            _abstract((s.rows,), jnp.int32))
    compiled = sampler._generate.lower(sampler.graphdef, state, *args, params=params_,
                                       cache_dtype=sampler.cache_dtype, compute_dtype=sampler.compute_dtype).compile()
    return ProgramMemory.of(compiled), sampler, compiled.output_shardings


def _compile_score(cfg, mc, graphdef, state, sampler, s: StepShapes, rollout_sh):
    """Old/reference log-probs of a whole step's rollouts (``rollout_logprobs``) on rollout arrays placed as
    ``rollout_sh`` says: one forward over all rows, or in ``exact`` consistency the sampler's own prefill +
    decode replay."""
    import jax.numpy as jnp
    from jaxrl_llm.sampling.score import _jitted_score
    from jaxrl_llm.trainer.packing import prompt_sharing

    r, n = cfg.rollout, s.rows
    arr = lambda shape, dtype, name: _abstract(shape, dtype, getattr(rollout_sh, name))  # noqa: E731
    response = (arr((n, s.response), jnp.int32, "tokens"), arr((n, s.response), jnp.bool_, "mask"))
    if r.consistency == "exact":  # the prompts of each group, once
        b = cfg.train.prompts_per_step
        lowered = sampler._score_exact.lower(sampler.graphdef, state, arr((b, s.prompt), jnp.int32, "prompt_ids"),
                                             arr((b, s.prompt), jnp.bool_, "prompt_mask"), *response, n=r.n,
                                             temperature=float(r.temperature), cache_dtype=sampler.cache_dtype,
                                             compute_dtype=sampler.compute_dtype)
        return ProgramMemory.of(lowered.compile())
    prompt = (arr((n, s.prompt), jnp.int32, "prompt_ids"), arr((n, s.prompt), jnp.bool_, "prompt_mask"))
    experts = None
    if r.routing_replay:
        experts = arr((mc.num_moe_layers, n, s.prompt + s.response, mc.num_experts_per_tok), jnp.int32, "experts")

    # the scorer's own jitted program (sampling/score.py: score), as the trainer calls it
    lowered = _jitted_score().lower(graphdef, state, *prompt, *response, experts, temperature=float(r.temperature),
                                    chunk=cfg.train.logprob_chunk, layer=None, group=prompt_sharing(cfg).score_group)
    return ProgramMemory.of(lowered.compile())


def _rollout_shardings(mesh, s: StepShapes, generated):
    """The rollout's placement when scoring: as the sampler returned it on the trainer's devices, or (from
    the sampler's own devices) moved back by ``_place_rows``."""
    if generated is not None:
        return generated
    rows, routes = _rows_sharding(mesh, s.rows), _rows_sharding(mesh, s.rows, axis=1)
    return dataclasses.make_dataclass("RolloutShardings", ["prompt_ids", "prompt_mask", "tokens", "mask",
                                                           "experts"])(rows, rows, rows, rows, routes)


def _replicated_on(mesh, tree):
    """``tree`` as abstract arrays replicated over ``mesh`` (the sampler's copy of the weights)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    return jax.tree.map(lambda x: _abstract(x.shape, x.dtype, NamedSharding(mesh, P())), tree)


def compile_plan(cfg, mc, sizes: dict[str, int], *, devices=None, cache: dict | None = None) -> MemoryPlan:
    """Lower and compile the update, generate and scoring programs on ``devices`` (default: the first local
    devices: the mesh's, then ``rollout.sampler_devices`` for a disaggregated sampler) and read XLA's memory
    analysis. Nothing is allocated.

    Arrays are placed as the trainer places them. ``cache`` (a dict) memoises programs across calls whose settings
    are equal.
    """
    import jax
    from flax import nnx
    from jaxrl_llm.parallel import make_mesh
    from jaxrl_llm.trainer.optim import run_optimizer

    n, k = math.prod(sizes.values()), cfg.rollout.sampler_devices
    devices = list(jax.devices()[:n + k] if devices is None else devices)
    if len(devices) != n + k:
        raise PlanError(f"mesh {mesh_text(sizes)}{f' + {k} sampler devices' if k else ''} needs {n + k} devices, "
                        f"{len(devices)} are available here")
    cache = {} if cache is None else cache
    start = time.perf_counter()
    mesh = make_mesh(sizes, devices[:n])
    sampler_mesh = make_mesh({"data": -1}, devices[n:]) if k else None
    s = step_shapes(cfg, sizes)
    model, graphdef, params, rest = _abstract_policy(cfg, mc, mesh)
    optimizer = run_optimizer(cfg)
    opt_state = _abstract_opt_state(optimizer, params, mesh)
    state = nnx.merge_state(params, rest)
    sampler_state = _replicated_on(sampler_mesh, state) if k else state
    m, r = cfg.model, cfg.rollout
    base = (mc, mesh_text(sizes), k, m.dtype, m.param_dtype, m.remat, s.prompt, s.response, r.n,
            cfg.train.prompts_per_step)
    update_key = ("update", base, s.micro, s.num_micro, dataclasses.astuple(cfg.algorithm))
    # the update and scoring are traced under their mesh, as the trainer does (parallel.constrain_rows)
    if update_key not in cache:
        with jax.set_mesh(mesh):
            cache[update_key] = _named("the update", _compile_update, cfg, mc, mesh, graphdef, params, rest,
                                       opt_state, optimizer, s)
    update, batch = cache[update_key]
    sample_key = ("generate", base, dataclasses.astuple(r))
    if sample_key not in cache:
        cache[sample_key] = _named("the sampler", _compile_generate, cfg, mc, model, sampler_state,
                                   sampler_mesh or mesh, s)
    generate, sampler, generated = cache[sample_key]
    score_key = ("score", base, dataclasses.astuple(r), cfg.train.logprob_chunk)
    if score_key not in cache:
        rollout_sh = _rollout_shardings(mesh, s, None if k else generated)
        with jax.set_mesh(mesh):
            cache[score_key] = _named("scoring", _compile_score, cfg, mc, graphdef, state, sampler, s, rollout_sh)
    score = cache[score_key]

    p, o = _tree_bytes(params), _tree_bytes(opt_state)
    a = cfg.algorithm
    plan_ = MemoryPlan(
        method="compiled", params=p, opt_state=o, ref_params=p if a.kl_coef > 0 else 0,
        critic=p + o if a.advantage == "gae" else 0,  # trunk + optimizer state (the value head is negligible)
        # async rollouts on the trainer's devices sample from a copy of the weights that outlives the update
        sampler_copy=p if r.async_rollout and not k else 0, disaggregated=bool(k),
        batch=batch, update_temp=update.temp, update_rest=update.peak - update.argument - update.temp,
        kv_cache=analytic_plan(cfg, mc, sizes).kv_cache, sample_temp=generate.temp,
        # the sampler's arguments hold the weights: resident already, unless they are a copy on its own devices
        sample_io=generate.peak - generate.temp - (0 if k else p),
        score_temp=score.temp, score_io=score.peak - score.temp - p,
        seconds=time.perf_counter() - start)
    if abs(update.argument - (p + o + batch + _tree_bytes(rest))) > 0.01 * update.argument:
        plan_.notes.append(f"update arguments: XLA counts {_fmt(update.argument)}, the shardings give "
                           f"{_fmt(p + o + batch)}")
    return plan_


def _named(program: str, compile_fn, *args):
    """``compile_fn(*args)``; a failure names the program (a config the trainer cannot run fails here too)."""
    try:
        return compile_fn(*args)
    except PlanError:
        raise
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise PlanError(f"{program} does not compile: {type(err).__name__}: {first}") from err


def _fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 1024 ** 2:.1f} MiB"


# ---------------------------------------------------------------------------------------------------------------
# variants: the configuration as given, and the suggestions re-evaluated when it does not fit


@dataclasses.dataclass
class Variant:
    label: str
    overrides: list[str]  # added after the user's overrides
    mesh: dict[str, int]

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())


def _mesh_overrides(sizes: dict[str, int]) -> list[str]:
    return [f"mesh.{a}={sizes[a]}" for a in MESH_AXES]


def _micro_batch_choices(cfg, dp: int) -> list[int]:
    """Smaller micro-batch sizes the config accepts (multiples of the data-parallel size dividing the
    minibatch), halving from the current one down to the smallest."""
    minibatch = cfg.train.prompts_per_step * cfg.rollout.n // cfg.algorithm.minibatches
    valid = [m for m in range(dp, cfg.train.micro_batch_size, dp) if minibatch % m == 0]
    chosen, target = [], cfg.train.micro_batch_size // 2
    while valid and target >= 1:
        best = max((m for m in valid if m <= target), default=None)
        if best is not None and best not in chosen:
            chosen.append(best)
        target //= 2
    if valid and min(valid) not in chosen:
        chosen.append(min(valid))
    return chosen


def _prompt_choices(cfg) -> list[int]:
    """Fewer prompts per step (halvings) that keep every minibatch a whole number of micro-batches: sampling and
    scoring handle a whole step's rows at once."""
    n, mb, micro = cfg.rollout.n, cfg.algorithm.minibatches, cfg.train.micro_batch_size
    out, p = [], cfg.train.prompts_per_step // 2
    while p >= 1 and len(out) < 3:
        if (p * n) % mb == 0 and (p * n // mb) % micro == 0:
            out.append(p)
        p //= 2
    return out


def suggestion_groups(cfg, sizes: dict[str, int]) -> list[list[Variant]]:
    """Groups of alternatives that reduce memory; within a group the first that fits is reported."""
    dp = sizes["data"] * sizes["fsdp"]
    groups: list[list[Variant]] = [
        [Variant(f"train.micro_batch_size={m}", [f"train.micro_batch_size={m}"], sizes)
         for m in _micro_batch_choices(cfg, dp)],
        [Variant(f"train.prompts_per_step={p}", [f"train.prompts_per_step={p}"], sizes) for p in _prompt_choices(cfg)]]
    if cfg.model.remat != "full":
        groups.append([Variant("model.remat=full", ["model.remat=full"], sizes)])
    wider = dict(sizes, data=1, fsdp=sizes["fsdp"] * sizes["data"]) if sizes["data"] > 1 else \
        dict(sizes, fsdp=sizes["fsdp"] * 2)
    if cfg.train.micro_batch_size % (wider["data"] * wider["fsdp"]) == 0:
        n = math.prod(wider.values())
        more = "" if n == math.prod(sizes.values()) else f" ({n} devices)"
        groups.append([Variant(f"--mesh {mesh_text(wider)}{more}", [], wider)])
    if cfg.model.param_dtype != "bfloat16":
        groups.append([Variant("model.param_dtype=bfloat16 model.dtype=bfloat16",
                               ["model.param_dtype=bfloat16", "model.dtype=bfloat16"], sizes)])
    return [g for g in groups if g]


def combined_variant(groups: list[list[Variant]], sizes: dict[str, int], skip=()) -> Variant | None:
    """Every lever at once (the last alternative of each group) but the groups in ``skip`` (that could not be
    compiled); a different mesh only when it keeps the device count."""
    parts = [g[-1] for i, g in enumerate(groups) if i not in skip]
    if len(parts) < 2:
        return None
    same = [v.mesh for v in parts if v.mesh != sizes and v.devices == math.prod(sizes.values())]
    label = "all of the above" + (" that compiled" if skip else "")
    return Variant(label, [o for v in parts for o in v.overrides], same[0] if same else sizes)


# ---------------------------------------------------------------------------------------------------------------
# running the compilations: here, or in a subprocess with fake CPU devices


def _variant_config(request: dict, v: Variant):
    overrides = list(request["overrides"]) + _mesh_overrides(v.mesh) + v.overrides
    return load_plan_config(request["config"], overrides, request["model"], v.devices)


def evaluate(request: dict, emit) -> None:
    """Compile the base variant and, when it exceeds ``request["limit"]``, each group of suggestions until one
    fits, then every lever at once; ``emit(key, variant, plan_or_None, error_or_None)`` receives every result as
    soon as it is known."""
    mc = resolve_model(request["model"])
    cache: dict = {}

    def run(key: str, v: Variant) -> MemoryPlan | None:
        try:
            result = compile_plan(_variant_config(request, v), mc, v.mesh, cache=cache)
        except Exception as err:  # reported per variant; the others still run
            text = str(err).splitlines()[0] if str(err) else ""
            emit(key, v, None, text if isinstance(err, PlanError) else f"{type(err).__name__}: {text}")
            return None
        emit(key, v, result, None)
        return result

    base_variant = Variant(**request["base"])
    base = run("base", base_variant)
    limit = request.get("limit")
    if base is None or limit is None or base.total <= limit:
        return
    groups = [[Variant(**v) for v in g] for g in request["groups"]]
    failed = set()
    for i, group in enumerate(groups):
        results = []
        for j, v in enumerate(group):
            results.append(run(f"{i}.{j}", v))
            if results[-1] is not None and results[-1].total <= limit:
                break
        if all(r is None for r in results):
            failed.add(i)
    combined = combined_variant(groups, base_variant.mesh, failed)
    if combined is not None:
        run("combined", combined)


def _force_devices_env(n: int) -> dict[str, str]:
    """The environment of a JAX process with ``n`` fake CPU devices. The generated code is never run, so LLVM
    need not optimise it: the memory figures are fixed before code generation and come out identical, in
    half the compile time."""
    env = dict(os.environ)
    ours = ("--xla_force_host_platform_device_count", "--xla_backend_optimization_level")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(ours)]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}",
                                         "--xla_backend_optimization_level=0"])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run_subprocess(request: dict, devices: int, timeout: float) -> tuple[dict, str | None]:
    """Run :func:`evaluate` in ``python -m jaxrl_llm.plan`` on ``devices`` fake CPU devices; returns the results
    received (by key) and, when the subprocess timed out or failed, why."""
    proc = subprocess.Popen([sys.executable, "-m", "jaxrl_llm.plan"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_force_devices_env(devices))
    problem = None
    try:
        out, err = proc.communicate(json.dumps(request), timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        problem = f"compilation did not finish within --timeout {timeout:g} s"
    results = {}
    for line in out.splitlines():
        if line.startswith("{"):
            item = json.loads(line)
            results[item["key"]] = item
    if problem is None and proc.returncode != 0:
        tail = "\n".join(err.strip().splitlines()[-5:])
        problem = f"the planning subprocess failed (exit code {proc.returncode}):\n{tail}"
    return results, problem


def _run_here(request: dict) -> dict:
    results = {}

    def emit(key, variant, result, error):
        results[key] = _result_json(key, variant, result, error)

    evaluate(request, emit)
    return results


def _result_json(key: str, variant: Variant, result: MemoryPlan | None, error: str | None) -> dict:
    return {"key": key, "variant": dataclasses.asdict(variant), "plan": result.to_json() if result else None,
            "error": error}


def _local_device_count() -> int | None:
    """Devices of the JAX backend already running in this process (None when JAX is not imported yet: then it is
    not started here, so that planning never takes hold of local accelerators unasked)."""
    if "jax" not in sys.modules:
        return None
    import jax

    return jax.device_count()


def _where(backend: str, devices: int) -> str:
    """``here`` or ``subprocess`` for ``--backend auto|local|cpu``."""
    if backend == "cpu":
        return "subprocess"
    if backend == "local":
        import jax

        if jax.device_count() < devices:
            raise PlanError(f"--backend local: the mesh needs {devices} devices, this process has "
                            f"{jax.device_count()} ({jax.devices()[0].platform}); use --backend cpu for fake devices")
        return "here"
    local = _local_device_count()
    return "here" if local is not None and local >= devices else "subprocess"


# ---------------------------------------------------------------------------------------------------------------
# the report


@dataclasses.dataclass
class Suggestion:
    label: str
    plan: MemoryPlan | None
    compiled: bool
    fits: bool | None
    error: str | None = None  # the variant could not be compiled


@dataclasses.dataclass
class Report:
    model: str
    num_params: int
    config: str | None
    mesh: dict[str, int]
    devices: int  # the mesh's and the sampler's own
    sampler_devices: int
    accelerator: str | None
    hbm: int | None
    usable: int | None
    shapes: StepShapes
    param_dtype: str
    analytic: MemoryPlan
    compiled: MemoryPlan | None
    backend: str = ""
    suggestions: list[Suggestion] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def best(self) -> MemoryPlan:
        return self.compiled or self.analytic

    @property
    def fits(self) -> bool | None:
        return None if self.usable is None else self.best.total <= self.usable

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["analytic"] = self.analytic.to_json()
        out["compiled"] = self.compiled.to_json() if self.compiled else None
        out["suggestions"] = [dict(dataclasses.asdict(x), plan=x.plan and x.plan.to_json()) for x in self.suggestions]
        return out | {"fits": self.fits, "total": self.best.total}


def _discrepancy_notes(a: MemoryPlan, c: MemoryPlan) -> list[str]:
    """Where the trainer's compiled programs need much more than the formula, which assumes the optimizer state
    sharded like the parameters and rows split over data x fsdp (heads and MLP columns over tensor)."""
    notes = []
    if c.opt_state > 1.5 * a.opt_state:
        notes.append("the optimizer state takes more than twice the parameters: some of it is not sharded like the "
                     "parameters")
    for name, what in (("update_temp", "the update"), ("sample_temp", "sampling"), ("score_temp", "scoring")):
        ratio = getattr(c, name) / max(getattr(a, name), 1)
        if ratio > 2:
            notes.append(f"{what} needs {ratio:.0f}x the estimated temporaries: XLA's partitioning of it splits the "
                         "work over the devices less than the estimate assumes")
    return notes


def plan(config: str | None, overrides=(), *, mesh: str | None = None, devices: int | None = None,
         model: str | None = None, accelerator: str | None = None, analytic_only: bool = False,
         timeout: float = 600.0, backend: str = "auto", suggest: bool = True,
         mem_fraction: float | None = None, progress=None) -> Report:
    """Plan the memory of ``config`` (+ ``overrides``) on a mesh; see the module docstring.

    Raises :class:`PlanError` for a mesh that does not match ``devices``, an unknown accelerator or model, or a
    config error.
    """
    if accelerator is not None and accelerator not in ACCELERATORS:
        raise PlanError(f"unknown accelerator {accelerator!r}; known: {', '.join(ACCELERATORS)}")
    if backend not in ("auto", "local", "cpu"):
        raise PlanError(f"backend must be auto, local or cpu, got {backend!r}")
    overrides = list(overrides)
    from jaxrl_llm.config import ConfigError, load_config

    try:  # the mesh section and the sampler's own devices, before the mesh is checked against the devices
        given = load_config(config, _with_model(overrides, model))
    except ConfigError as err:
        raise PlanError(f"config: {err}") from None
    k = given.rollout.sampler_devices
    sizes, n = resolve_mesh(parse_mesh(mesh) if mesh else dataclasses.asdict(given.mesh), devices, k)
    hbm, usable = accelerator_memory(accelerator, n + k)
    if usable is not None and mem_fraction is not None:
        if not 0 < mem_fraction <= 1:
            raise PlanError(f"--mem-fraction must be in (0, 1], got {mem_fraction}")
        usable = int(hbm * mem_fraction)
    cfg = load_plan_config(config, overrides + _mesh_overrides(sizes), model, n)
    spec = model or cfg.model.path
    mc = resolve_model(spec)
    report = Report(model=spec, num_params=mc.num_params(), config=config, mesh=sizes, devices=n + k,
                    sampler_devices=k,
                    accelerator=accelerator, hbm=hbm, usable=usable, shapes=step_shapes(cfg, sizes),
                    param_dtype=cfg.model.param_dtype, analytic=analytic_plan(cfg, mc, sizes), compiled=None)
    groups = suggestion_groups(cfg, sizes) if suggest and usable is not None else []
    results = {}
    if analytic_only:
        report.notes.append("analytic estimate only (--analytic)")
    else:
        results = _compile_into(report, config, overrides, spec, groups, timeout, backend, progress)
    _add_suggestions(report, config, overrides, spec, mc, groups, results)
    return report


def _with_model(overrides: list[str], model: str | None) -> list[str]:
    if model and not any(o.split("=", 1)[0].strip() == "model.path" for o in overrides):
        return [f"model.path={model}"] + overrides
    return overrides


def _compile_into(report: Report, config, overrides, spec, groups, timeout, backend, progress) -> dict:
    """Compile the base plan (and the suggestions while it does not fit) into ``report``; returns every result by
    key."""
    base = Variant("as given", [], report.mesh)
    request = {"config": config, "overrides": overrides, "model": spec, "base": dataclasses.asdict(base),
               "groups": [[dataclasses.asdict(v) for v in g] for g in groups], "limit": report.usable}
    # suggestions on more devices than this process has fall back to estimates; a subprocess gets enough
    most = max([report.devices] + [v.devices + report.sampler_devices for g in groups for v in g])
    where = _where(backend, report.devices)
    if where == "here":
        import jax

        kind = jax.devices()[0].device_kind
        report.backend = f"{report.devices} local {kind} devices"
        if progress:
            progress(f"compiling on {report.backend} ...")
        results, problem = _run_here(request), None
    else:
        report.backend = f"{report.devices} fake CPU devices"
        report.notes.append("compiled by XLA:CPU on fake devices: TPU/GPU compilers fuse, schedule and lay out "
                            "memory differently, so the compiled figures approximate theirs; XLA:CPU's analysis "
                            "shows no saving from rematerialisation (model.remat), so its figures there are upper "
                            "bounds")
        if progress:
            progress(f"compiling on {most} fake CPU devices in a subprocess (timeout {timeout:g} s) ...")
        results, problem = _run_subprocess(request, most, timeout)
    got = results.get("base")
    if got and got.get("plan"):
        report.compiled = MemoryPlan.from_json(got["plan"])
        report.notes += report.compiled.notes + _discrepancy_notes(report.analytic, report.compiled)
    elif got and got.get("error"):  # e.g. a setting the trainer's programs do not support yet
        report.notes.insert(0, f"{got['error']}; the figures are analytic estimates")
    if problem:
        what = "; the figures below are analytic estimates" if report.compiled is None else \
            "; suggestions not compiled in time are analytic estimates"
        report.notes.append(problem + what)
    return results


def _add_suggestions(report: Report, config, overrides, spec, mc, groups, results: dict) -> None:
    """For each group, the first alternative that fits (compiled when the compilation got to it), then every
    lever at once."""
    if not groups or report.fits is not False:
        return
    for i, group in enumerate(groups):
        chosen = None
        for j, v in enumerate(group):
            chosen = _suggestion(report, config, overrides, spec, mc, v, results.get(f"{i}.{j}"))
            if chosen is not None and chosen.fits:
                break
        if chosen is not None:
            report.suggestions.append(chosen)
    got = results.get("combined")
    combined = Variant(**got["variant"]) if got else combined_variant(groups, report.mesh)
    if combined is not None:
        chosen = _suggestion(report, config, overrides, spec, mc, combined, got)
        if chosen is not None:
            report.suggestions.append(chosen)


def _suggestion(report: Report, config, overrides, spec, mc, v: Variant, got: dict | None) -> Suggestion | None:
    """A compiled result, a compile error, or (not compiled in time) an estimate; None for an invalid config."""
    if got and got.get("plan"):
        plan_ = MemoryPlan.from_json(got["plan"])
        return Suggestion(v.label, plan_, True, plan_.total <= report.usable)
    if got and got.get("error"):
        return Suggestion(v.label, None, True, False, got["error"])
    try:
        cfg = load_plan_config(config, overrides + _mesh_overrides(v.mesh) + v.overrides, spec, v.devices)
    except PlanError:
        return None
    plan_ = analytic_plan(cfg, mc, v.mesh)
    if report.compiled is not None:
        # keep the extra (unsharded) memory the compiled base plan revealed
        plan_ = _scaled_like(plan_, report.analytic, report.compiled)
    return Suggestion(v.label, plan_, False, plan_.total <= report.usable)


_SCALED = ("opt_state", "update_temp", "sample_temp", "score_temp")


def _scaled_like(plan_: MemoryPlan, analytic: MemoryPlan, compiled: MemoryPlan, names=_SCALED) -> MemoryPlan:
    """An analytic variant scaled, term by term, by the compiled/analytic ratio of the base configuration."""
    out = dataclasses.replace(plan_, notes=[])
    for name in names:
        a = getattr(analytic, name)
        if a:
            setattr(out, name, int(getattr(plan_, name) * getattr(compiled, name) / a))
    out.method = "analytic, scaled"
    return out


def _row(label: str, analytic: int | None, compiled: int | str | None, with_compiled: bool) -> str:
    a = "-" if not analytic else _fmt(analytic)
    c = compiled if isinstance(compiled, str) else "-" if not compiled else _fmt(compiled)
    return f"  {label:<46}{a:>12}" + (f"{c:>13}" if with_compiled else "")


def format_report(r: Report) -> str:
    """The human-readable plan."""
    a, c, s = r.analytic, r.compiled, r.shapes
    both = c is not None
    src = f" with {r.config}" if r.config else ""
    acc = "no accelerator given (--accelerator)" if r.accelerator is None else \
        f"accelerator {r.accelerator}: {_fmt(r.hbm)} HBM per device" + \
        (f", {_fmt(r.usable)} usable by JAX" if r.usable != r.hbm else "")
    own = f" + {r.sampler_devices} sampler devices" if r.sampler_devices else ""
    size = f"{r.num_params / 1e9:.2f} B" if r.num_params >= 1e8 else f"{r.num_params / 1e6:.2f} M"
    lines = [f"Memory plan for {r.model} ({size} parameters){src}",
             f"mesh {mesh_text(r.mesh)}{own} ({r.devices} devices); {acc}",
             f"step: {s.rows} rows of {s.prompt} prompt + {s.response} response tokens; micro-batches of {s.micro} "
             f"rows ({max(s.micro // s.dp, 1)} per device), {s.num_micro} per minibatch"]
    if both:
        lines.append(f"compiled ahead of time on {r.backend} in {c.seconds:.0f} s")
    lines += ["", f"  {'per device':<46}{'analytic':>12}" + (f"{'compiled':>13}" if both else "")]
    get = (lambda name: getattr(c, name)) if both else (lambda name: None)
    rows = [(f"parameters ({r.param_dtype})", "params"), ("optimizer state (AdamW mu, nu)", "opt_state"),
            ("reference policy (kl_coef > 0)", "ref_params"), ("critic (parameters + optimizer)", "critic"),
            ("sampler's copy of the weights (async)", "sampler_copy"), ("update: micro-batch inputs", "batch"),
            ("update: gradients, activations (temp)", "update_temp")]
    for label, name in rows:
        if name != "sampler_copy" or a.sampler_copy:
            lines.append(_row(label, getattr(a, name), get(name), both))
    where = "sampler devices" if a.disaggregated else "sampler"
    lines.append(_row(f"{where}: KV cache ({s.rows} rows x {s.prompt + s.response} slots)", a.kv_cache, "in temp",
                      both))
    if a.disaggregated:
        lines.append(_row("sampler devices: weights (replicated)", a.sample_io, get("sample_io"), both))
    lines.append(_row(f"{where}: temp (KV, logits, decode)", a.sample_temp, get("sample_temp"), both))
    lines.append(_row(f"scoring: temp ({s.rows} rows, forward)", a.score_temp, get("score_temp"), both))
    for phase, value in a.phases.items():
        label = f"peak during {phase}" + (" (sampler devices)" if phase == "sampling" and a.disaggregated else "")
        lines.append(_row(label, value, c.phases[phase] if both else None, both))
    lines.append(_row("total (largest peak)", a.total, c.total if both else None, both))
    lines += ["", _verdict(r)]
    if r.notes:
        lines += ["", "notes:"] + [textwrap.fill(n, 116, initial_indent="  - ", subsequent_indent="    ")
                                   for n in r.notes]
    if r.suggestions:
        lines += ["", "suggestions, each re-evaluated on its own (of each kind the first that fits, else the "
                      "last tried):"]
        for sug in r.suggestions:
            lines += _suggestion_lines(sug)
    return "\n".join(lines)


def _suggestion_lines(sug: Suggestion) -> list[str]:
    """``label  total  verdict`` and, indented, the peak of each phase (which phase a change helps)."""
    if sug.plan is None:
        error = sug.error.split(" (http")[0]  # drop documentation links
        return [f"  {sug.label:<62}fails: {error[:110]}"]
    how = "compiled" if sug.compiled else sug.plan.method
    phases = ", ".join(f"{k} {_fmt(v)}" for k, v in sug.plan.phases.items())
    return [f"  {sug.label:<62}{_fmt(sug.plan.total):>11}  {'fits' if sug.fits else 'does not fit'} ({how})",
            f"      peaks: {phases}"]


def _verdict(r: Report) -> str:
    total = r.best.total
    basis = "compiled" if r.compiled else "analytic"
    if r.usable is None:
        return f"total {_fmt(total)} per device ({basis}); pass --accelerator to check it against HBM"
    if r.fits:
        return (f"fits {r.accelerator}: {_fmt(total)} of {_fmt(r.usable)} per device ({basis}, "
                f"{100 * total / r.usable:.0f}% used)")
    return f"does NOT fit {r.accelerator}: {_fmt(total)} needed per device ({basis}), {_fmt(r.usable)} available"


# ---------------------------------------------------------------------------------------------------------------
# entry points


def run_cli(args) -> int:
    """``jaxrl-llm plan``: print the plan; exit code 0 when it fits (or no accelerator was named), 1 when not."""
    report = plan(args.config, args.overrides, mesh=args.mesh, devices=args.devices, model=args.model_config,
                  accelerator=args.accelerator, analytic_only=args.analytic, timeout=args.timeout,
                  backend=args.backend, suggest=not args.no_suggest, mem_fraction=args.mem_fraction,
                  progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(json.dumps(report.to_json(), indent=1) if args.json else format_report(report))
    return 1 if report.fits is False else 0


def _worker() -> int:
    """Subprocess side of :func:`_run_subprocess`: a request on stdin, one JSON line per result on stdout."""
    request = json.loads(sys.stdin.read())

    def emit(key, variant, result, error):
        print(json.dumps(_result_json(key, variant, result, error)), flush=True)

    evaluate(request, emit)
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
