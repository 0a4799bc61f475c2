"""What a plan is asked about: the target mesh and accelerator, the model, the run config."""
from __future__ import annotations

import json
import math
import os
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

MESH_AXES = ("data", "fsdp", "tensor", "expert")  # as jaxrl_llm.parallel (not imported: it pulls in jax)


class PlanError(ValueError):
    """A planning request that cannot be answered (bad mesh, unknown accelerator or model, ...)."""


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


def with_model(overrides: list[str], model: str | None) -> list[str]:
    """``overrides`` with ``model.path`` set to ``model`` unless they set it already."""
    if model and not any(o.split("=", 1)[0].strip() == "model.path" for o in overrides):
        return [f"model.path={model}"] + list(overrides)
    return list(overrides)


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 1024 ** 2:.1f} MiB"


