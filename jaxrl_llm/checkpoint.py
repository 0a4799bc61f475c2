"""Training checkpoints on top of orbax's CheckpointManager.

A checkpoint holds two items:
  * ``state``: a pytree of arrays (parameters, optimizer state, PRNG key data, step counters). It is saved
    asynchronously and restored straight into the shardings of an abstract target, so a sharded run restores
    sharded arrays without gathering them.
  * ``meta``: a JSON document (data-iterator state, run bookkeeping).

orbax writes every step into a temporary directory and renames it only once all items are complete, so a run
killed in the middle of a save resumes from the last complete checkpoint: incomplete directories are never
listed as steps.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxrl_llm.errors import UserError

__all__ = ["Checkpointer"]


class Checkpointer:
    """Saves and restores ``(state, meta)`` pairs keyed by step.

    Args:
      directory: where the step directories live (created if missing).
      keep: how many of the newest checkpoints to keep (``None`` keeps all).
      async_save: write in a background thread; call :meth:`wait` before reading the files.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int | None = 3, async_save: bool = True):
        if keep is not None and keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1 or None, got {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def save(self, step: int, state: Any, meta: dict | None = None) -> None:
        """Start saving ``state`` (pytree of arrays) and ``meta`` (JSON-able dict) as ``step``."""
        self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})),
            force=True,
        )

    def latest_step(self) -> int | None:
        """The newest complete step, or ``None`` when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore ``(state, meta)``.

        ``target`` is a pytree with the structure of the saved state whose leaves are arrays or
        ``jax.ShapeDtypeStruct`` carrying the desired sharding; restored arrays take those shardings.
        """
        if step is None:
            step = self.latest_step()
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        abstract = jax.tree.map(_as_abstract, target)
        try:
            restored = self._manager.restore(
                int(step),
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
            )
        except (ValueError, KeyError, TypeError, FileNotFoundError) as err:  # what orbax raises on a mismatch
            reason = " ".join(str(err).split())[:300]
            raise UserError(f"cannot restore step {step} of {self.directory}: it does not fit this run's state "
                            f"(another model or algorithm wrote it?): {reason}. Set checkpoint.overwrite=true to "
                            "start afresh, or choose another log.run_dir") from err
        return restored["state"], dict(restored["meta"] or {})

    def reached_preemption(self, step: int) -> bool:
        """Whether every process of a multi-process run reached the step at which to save after a preemption
        notice (JAX's preemption sync point; always False for a single process). Call at every step."""
        return bool(self._manager.reached_preemption(int(step)))

    def wait(self) -> None:
        """Block until a background save has finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _as_abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
