"""Variants of a configuration (the one given, and suggestions when it does not fit) and where they are compiled:
in this process, or in a subprocess with fake CPU devices."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

from jaxrl_llm.plan.inputs import MESH_AXES, PlanError, load_plan_config, mesh_text, resolve_model
from jaxrl_llm.plan.memory import MemoryPlan
from jaxrl_llm.plan.programs import compile_plan


@dataclasses.dataclass
class Variant:
    label: str
    overrides: list[str]  # added after the user's overrides
    mesh: dict[str, int]

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())


def mesh_overrides(sizes: dict[str, int]) -> list[str]:
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
    from jaxrl_llm.models.remat import resolve_remat

    dp = sizes["data"] * sizes["fsdp"]
    groups: list[list[Variant]] = [
        [Variant(f"train.micro_batch_size={m}", [f"train.micro_batch_size={m}"], sizes)
         for m in _micro_batch_choices(cfg, dp)],
        [Variant(f"train.prompts_per_step={p}", [f"train.prompts_per_step={p}"], sizes) for p in _prompt_choices(cfg)]]
    if resolve_remat(cfg.model.remat, cfg.rollout.max_new_tokens) != "full":
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


def _variant_config(request: dict, v: Variant):
    overrides = list(request["overrides"]) + mesh_overrides(v.mesh) + v.overrides
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
    half the compile time. XLA:CPU computes bfloat16 in float32; allowed excess precision, it also keeps the
    widened float32 values as the residuals of the backward pass, where TPUs and GPUs keep bfloat16, so it is
    not allowed here."""
    env = dict(os.environ)
    ours = ("--xla_force_host_platform_device_count", "--xla_backend_optimization_level",
            "--xla_allow_excess_precision")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(ours)]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}",
                                         "--xla_backend_optimization_level=0", "--xla_allow_excess_precision=false"])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_subprocess(request: dict, devices: int, timeout: float) -> tuple[dict, str | None]:
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


def run_here(request: dict) -> dict:
    results = {}

    def emit(key, variant, result, error):
        results[key] = result_json(key, variant, result, error)

    evaluate(request, emit)
    return results


def result_json(key: str, variant: Variant, result: MemoryPlan | None, error: str | None) -> dict:
    return {"key": key, "variant": dataclasses.asdict(variant), "plan": result.to_json() if result else None,
            "error": error}


def _local_device_count() -> int | None:
    """Devices of the JAX backend already running in this process (None when JAX is not imported yet: then it is
    not started here, so that planning never takes hold of local accelerators unasked)."""
    if "jax" not in sys.modules:
        return None
    import jax

    return jax.device_count()


def compile_location(backend: str, devices: int) -> str:
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
