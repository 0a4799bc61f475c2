"""Training checkpoints on top of orbax's CheckpointManager.

A checkpoint holds two items:
  * ``state``: a pytree of arrays (parameters, optimizer state, PRNG key data, step counters). It is saved
    asynchronously and restored straight into the shardings of an abstract target, so a sharded run restores
    sharded arrays without gathering them.
  * ``meta``: a JSON document (data-iterator state, run bookkeeping).

orbax writes every step into a temporary directory and renames it only once all items are complete, so a run
killed in the middle of a save resumes from the last complete checkpoint: incomplete directories are never
listed as steps.

Where checkpoints can live: orbax 0.12 reaches storage through etils.epath (directories, metadata) and
tensorstore (array data), whose drivers are ``file`` (an absolute local path) and ``gcs`` (a ``gs://`` URI; epath
then needs ``gcsfs`` or TensorFlow). A ``file://`` URI is turned into its local path; other URIs (``s3://``,
``memory://`` ...) are refused at start with an error naming ``checkpoint.dir``, which can put the checkpoints of a
run directory on such a filesystem somewhere orbax can write.

Keeping the best checkpoint: with ``best_metric``, checkpoints saved with metrics are also ranked by that metric
and the best one is kept beside the ``keep`` newest (orbax's ``LatestN`` and ``BestN`` preservation policies).
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxrl_llm import paths
from jaxrl_llm.errors import UserError

__all__ = ["Checkpointer", "checkpoint_directory"]


class _QuietUnrankedSaves(logging.Filter):
    """Saves between evaluations carry no metrics by design; orbax warns about each of them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietUnrankedSaves())


def checkpoint_directory(directory) -> str:
    """The directory as orbax wants it: an absolute local path or a ``gs://`` URI (others are an error)."""
    directory = os.fspath(directory)
    local = paths.local_path(directory)
    if local is not None:
        return os.path.abspath(local)
    if paths.protocol(directory) == "gs":
        return directory.rstrip("/")
    raise ValueError(f"checkpoint.dir: orbax writes checkpoints to local paths and gs:// only (tensorstore's file "
                     f"and gcs drivers), not {directory!r}; set checkpoint.dir to a local or gs:// directory")


class Checkpointer:
    """Saves and restores ``(state, meta)`` pairs keyed by step.

    Args:
      directory: where the step directories live (created if missing).
      keep: how many of the newest checkpoints to keep (``None`` keeps all).
      async_save: write in a background thread; call :meth:`wait` before reading the files.
      best_metric, best_mode: also keep the checkpoint with the best value (``max`` or ``min``) of this key of
        the ``metrics`` given to :meth:`save`.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int | None = 3, async_save: bool = True,
                 best_metric: str | None = None, best_mode: str = "max"):
        if keep is not None and keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1 or None, got {keep}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"checkpoint.best_mode: got {best_mode!r}; allowed: max, min")
        self.directory = checkpoint_directory(directory)
        self.best_metric = best_metric
        from orbax.checkpoint import checkpoint_managers as cm

        policies = [cm.LatestN(n=keep)]
        best_fn = None if best_metric is None else functools.partial(_metric, best_metric)
        if best_fn is not None:
            policies.append(cm.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
                                     keep_checkpoints_without_metrics=False))
        # best_fn also makes orbax store the metrics with the step (and rank them in best_step())
        options = ocp.CheckpointManagerOptions(
            preservation_policy=cm.AnyPreservationPolicy(policies),
            best_fn=best_fn,
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def save(self, step: int, state: Any, meta: dict | None = None, metrics: dict | None = None) -> None:
        """Start saving ``state`` (pytree of arrays) and ``meta`` (JSON-able dict) as ``step``; ``metrics`` (with
        ``best_metric`` among them) rank it for keeping the best."""
        if metrics is not None and self.best_metric is not None:
            if self.best_metric not in metrics:
                raise KeyError(f"checkpoint.best_metric={self.best_metric!r} is not among the metrics of step {step}: "
                               f"{sorted(metrics)}")
            metrics = {self.best_metric: float(metrics[self.best_metric])}
        elif self.best_metric is None:
            metrics = None
        self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})),
            metrics=metrics,
            force=True,
        )

    def best_step(self) -> int | None:
        """The saved step with the best ``best_metric`` (None without a best metric or ranked checkpoint)."""
        if self.best_metric is None:
            return None
        return self._manager.best_step()

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


def _metric(name: str, metrics: dict) -> float:
    return float(metrics[name])


def _as_abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
