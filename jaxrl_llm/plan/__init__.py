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

from jaxrl_llm.plan.analytic import analytic_plan
from jaxrl_llm.plan.inputs import (ACCELERATORS, GiB, MESH_AXES, MODEL_PRESETS, PlanError, load_plan_config, parse_mesh,
                                  resolve_mesh, resolve_model)
from jaxrl_llm.plan.memory import MemoryPlan, ProgramMemory, StepShapes
from jaxrl_llm.plan.programs import compile_plan, compile_programs
from jaxrl_llm.plan.report import Report, format_report, plan, run_cli

__all__ = ["ACCELERATORS", "GiB", "MESH_AXES", "MODEL_PRESETS", "PlanError", "ProgramMemory", "MemoryPlan", "Report",
           "StepShapes", "parse_mesh", "resolve_mesh", "resolve_model", "load_plan_config", "analytic_plan",
           "compile_plan", "compile_programs", "plan", "format_report", "run_cli"]
