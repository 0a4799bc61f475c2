"""Checks at the end of every step that stop a run going nowhere: divergence and failing rewards.

Divergence (:class:`DivergenceGuard`), with ``theta_k`` the policy weights after step ``k``:

* any weight non-finite: stop at once (nothing after it can be trusted);
* ``| ||theta_k|| - ||theta_{k-1}|| | > train.halt_weight_jump * ||theta_{k-1}||``: stop at once. The left side
  is a lower bound of the update's size ``||theta_k - theta_{k-1}||`` (triangle inequality) that needs no copy of
  the old weights. Healthy fine-tuning moves the weights by a small fraction of their norm per step (Adam's
  updates are about ``lr`` per coordinate, 1e-6..1e-3 of typical weights); a step that doubles or erases the
  norm is a learning rate orders of magnitude too large (``train.lr=1e6`` sends every logit to zero in one step;
  ``1e30`` overflows the next forward);
* ``train.halt_nonfinite_steps`` consecutive steps whose updates were skipped because the loss or the gradient
  was not finite (the update step already refuses to apply those): stop.

A stopped run saves nothing more; :func:`check_finite` also refuses to save or export non-finite weights.
Failing rewards are :class:`jaxrl_llm.rewards.health.RewardMonitor`'s; :class:`StepChecks` runs both.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxrl_llm.distributed import host
from jaxrl_llm.errors import Diverged, RunStopped
from jaxrl_llm.rewards.health import RewardMonitor

__all__ = ["DivergenceGuard", "StepChecks", "check_finite", "weight_stats"]


@jax.jit
def _stats(tree):
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    squares = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
    return jnp.sqrt(squares), finite


def weight_stats(tree) -> tuple[float, bool]:
    """``(global L2 norm, every entry finite)`` of a pytree of arrays, in one pass on the devices. The norm of
    finite weights may overflow to inf (entries near 1e19 and above in float32): the flag tells the two apart."""
    norm, finite = _stats(tree)
    return float(host(norm)), bool(host(finite))


def check_finite(tree, what: str) -> None:
    """Raise :class:`Diverged` unless every entry of ``tree`` is finite (before a save or an export)."""
    if not weight_stats(tree)[1]:
        raise Diverged(f"refusing to write {what}: the weights hold NaN or inf")


class DivergenceGuard:
    """The divergence rules of the module docstring; :meth:`inspect` after each step."""

    def __init__(self, *, nonfinite_steps: int = 3, weight_jump: float = 1.0, lr: float | None = None):
        self.nonfinite_steps = int(nonfinite_steps)
        self.weight_jump = float(weight_jump)
        self.lr = lr
        self.norm = float("nan")
        self.skipped_in_a_row = 0

    def start(self, params) -> None:
        """Take the weights before the first step to inspect."""
        self.norm, _ = weight_stats(params)
        self.skipped_in_a_row = 0

    def _hint(self) -> str:
        return f" (train.lr={self.lr:g}: lower it)" if self.lr is not None else ""

    def inspect(self, step: int, params, metrics: dict) -> Diverged | None:
        """Add ``param_norm`` to ``metrics``; the reason to stop, if any."""
        norm, finite = weight_stats(params)
        metrics["param_norm"] = norm
        previous, self.norm = self.norm, norm
        if not finite:
            return Diverged(f"training diverged at step {step}: the weights hold NaN or inf{self._hint()}")
        jump = abs(norm - previous) / max(previous, 1e-30)
        if self.weight_jump > 0 and not jump <= self.weight_jump:  # inf and nan count as a jump
            return Diverged(f"training diverged at step {step}: one step took the weights' norm from {previous:.4g} "
                            f"to {norm:.4g} (relative change {jump:.3g} > train.halt_weight_jump="
                            f"{self.weight_jump:g}){self._hint()}")
        skipped = metrics.get("skipped_nonfinite", 0.0)
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped > 0 or not math.isfinite(skipped) else 0
        if self.nonfinite_steps and self.skipped_in_a_row >= self.nonfinite_steps:
            loss, gnorm = metrics.get("loss", float("nan")), metrics.get("grad_norm", float("nan"))
            return Diverged(f"training diverged: the updates of the last {self.skipped_in_a_row} steps (to step "
                            f"{step}) were skipped because the loss or gradient was not finite (loss {loss:.4g}, "
                            f"grad_norm {gnorm:.4g}; train.halt_nonfinite_steps={self.nonfinite_steps}){self._hint()}")
        return None


class StepChecks:
    """Divergence and reward health, checked after every step: :meth:`start` before the first, then
    :meth:`inspect` returns the exception to raise (after the step's metrics are logged) or None."""

    def __init__(self, cfg):
        t, r = cfg.train, cfg.reward
        self.divergence = DivergenceGuard(nonfinite_steps=t.halt_nonfinite_steps, weight_jump=t.halt_weight_jump,
                                          lr=t.lr)
        self.rewards = RewardMonitor([s.name for s in r.fns], max_failure_frac=r.max_failure_frac,
                                     window=r.failure_window)
        self.checkpointer = None

    def start(self, params, checkpointer=None) -> None:
        """Before the first step: the weights to compare the next step's with; the checkpointer named in the
        message when the run stops."""
        self.divergence.start(params)
        self.checkpointer = checkpointer

    def inspect(self, step: int, params, metrics: dict) -> RunStopped | None:
        problem = self.divergence.inspect(step, params, metrics) or self.rewards.inspect(step, metrics)
        if problem is not None and self.checkpointer is not None:
            latest = self.checkpointer.latest_step()
            where = (f"the latest checkpoint is step {latest} in {self.checkpointer.directory}" if latest is not None
                     else "no checkpoint was saved")
            problem.args = (f"{problem.args[0]}; nothing of this step is saved, {where}",)
        return problem
