"""Optimizer construction: AdamW with warm-up, a decay schedule and global-norm clipping (optax)."""
from __future__ import annotations

import jax
import optax

SCHEDULES = ("constant", "cosine", "linear")


def make_schedule(lr: float, *, steps: int, warmup_steps: int = 0, schedule: str = "constant",
                  final_lr_ratio: float = 0.0) -> optax.Schedule:
    """Learning rate per optimizer update: linear warm-up from 0 over ``warmup_steps``, then
    constant, cosine or linear decay to ``final_lr_ratio * lr`` at ``steps``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {schedule!r}")
    if lr <= 0:
        raise ValueError(f"train.lr must be > 0, got {lr}")
    if warmup_steps < 0 or steps < 1:
        raise ValueError(f"need train.steps >= 1 and train.warmup_steps >= 0, got {steps}, {warmup_steps}")
    decay_steps = max(steps - warmup_steps, 1)
    end = lr * final_lr_ratio
    if schedule == "constant":
        after = optax.constant_schedule(lr)
    elif schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=final_lr_ratio)
    else:
        after = optax.linear_schedule(lr, end, decay_steps)
    if warmup_steps == 0:
        return after
    warm = optax.linear_schedule(0.0, lr, warmup_steps)
    return optax.join_schedules([warm, after], [warmup_steps])


def make_optimizer(lr: float, *, steps: int, warmup_steps: int = 0, schedule: str = "constant",
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   grad_clip: float | None = 1.0, final_lr_ratio: float = 0.0) -> optax.GradientTransformation:
    """AdamW preceded by global-norm clipping (``grad_clip=None`` or 0 disables clipping)."""
    sched = make_schedule(lr, steps=steps, warmup_steps=warmup_steps, schedule=schedule,
                          final_lr_ratio=final_lr_ratio)
    parts = []
    if grad_clip:
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)


def opt_state_shardings(optimizer: optax.GradientTransformation, params, replicated):
    """Where the optimizer state of ``params`` lives: every per-parameter leaf (Adam's moments) is sharded like its
    parameter, the rest (step counts) is ``replicated``. ``jax.jit(optimizer.init)`` alone does not do this: its
    outputs (zeros) do not depend on the parameters' values, so XLA is free to replicate them."""
    shapes = jax.eval_shape(optimizer.init, params)
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    return optax.tree_map_params(optimizer, lambda _, sharding: sharding, shapes, param_sh,
                                 transform_non_params=lambda _: replicated)


def run_optimizer(cfg, lr: float | None = None) -> optax.GradientTransformation:
    """The optimizer of a run config (``TrainConfig``): one update per minibatch over the whole run; ``lr``
    overrides ``train.lr`` (e.g. the critic's)."""
    a, t = cfg.algorithm, cfg.train
    return make_optimizer(t.lr if lr is None else lr, steps=t.steps * a.ppo_epochs * a.minibatches,
                          warmup_steps=t.warmup_steps, schedule=t.schedule, weight_decay=t.weight_decay, b1=t.b1,
                          b2=t.b2, grad_clip=t.grad_clip or None)


def init_opt_state(optimizer: optax.GradientTransformation, params, replicated):
    """The optimizer state of ``params``, created on device where :func:`opt_state_shardings` places it."""
    return jax.jit(optimizer.init, out_shardings=opt_state_shardings(optimizer, params, replicated))(params)
