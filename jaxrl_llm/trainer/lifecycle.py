"""A run's life around the training loop: what the run directory holds at start, stop requests (SIGTERM, SIGINT,
the accelerator's preemption notice) and when to save.

Run directory at start (:func:`open_checkpoints`), for ``<log.run_dir>/checkpoints``:

=====================================  ===========================================================================
state                                  what happens
=====================================  ===========================================================================
no checkpoint                          a fresh run
checkpoints, ``checkpoint.resume``     the run continues from the latest one (default)
checkpoints, ``resume=false``          error at start, naming ``checkpoint.overwrite=true`` (or another run dir)
``checkpoint.overwrite=true``          the earlier run's checkpoints, metrics, events and export are deleted first
=====================================  ===========================================================================

Stops (:class:`StopWatch`): the first SIGTERM or SIGINT asks the loop to save a checkpoint at the end of the
current step and stop (:class:`jaxrl_llm.errors.Interrupted`, exit code 75); a second one stops at once. In a
multi-process run JAX's preemption service owns SIGTERM (it is how TPU and cluster schedulers announce an
eviction) and every process asks :func:`jax.experimental.multihost_utils.reached_preemption_sync_point` (through
orbax) at every step, so all processes save the same step; the processes also agree on SIGINT and on the periodic
saves through one small all-gather per step, so they never disagree about whether to save.

Periodic saves: every ``checkpoint.every`` steps, and at the end of any step that ends ``checkpoint.every_minutes``
or more after the previous save (or the start), so a preempted run loses at most about that much work whatever
its step time.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time

import numpy as np

from jaxrl_llm import paths
from jaxrl_llm.checkpoint import Checkpointer
from jaxrl_llm.errors import UserError

__all__ = ["open_checkpoints", "StopWatch", "Poll", "RUN_ARTEFACTS"]

# what a run writes into its directory; checkpoint.overwrite deletes these and nothing else
RUN_ARTEFACTS = ("checkpoints", "metrics.jsonl", "tensorboard", "hf", "config.yaml")


def _check_writable(run_dir: str) -> None:
    if paths.is_uri(run_dir):  # remote storage: written through the path layer, checked by its first write
        paths.makedirs(run_dir)
        return
    run_dir = paths.local_path(run_dir) or run_dir
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UserError(f"log.run_dir={run_dir} is a file, not a directory")
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as err:
        raise UserError(f"log.run_dir={run_dir}: cannot create it ({err.strerror or err})") from err
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise UserError(f"log.run_dir={run_dir} is not writable")


def _delete_artefacts(run_dir: str) -> None:
    for name in RUN_ARTEFACTS:
        path = paths.join(run_dir, name)
        if paths.isdir(path):
            paths.rmtree(path)
        elif paths.exists(path):
            paths.remove(path)


def _sync(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def open_checkpoints(cfg) -> Checkpointer:
    """The run's :class:`Checkpointer` after applying the run-directory policy of the module docstring; the
    caller restores when it holds a step. Raises :class:`UserError` naming the key to change."""
    import jax

    run_dir, c = cfg.log.run_dir, cfg.checkpoint
    if jax.process_index() == 0:
        _check_writable(run_dir)
    directory = c.dir or paths.join(run_dir, "checkpoints")
    if c.overwrite:
        if jax.process_index() == 0:
            _delete_artefacts(run_dir)
        _sync("jaxrl_llm_overwrite")  # no process may list the old checkpoints after this point
    checkpointer = Checkpointer(directory, keep=c.keep, async_save=c.async_save, best_metric=c.best_metric,
                                best_mode=c.best_mode)
    latest = checkpointer.latest_step()
    if latest is not None and not c.resume:
        checkpointer.close()
        raise UserError(f"log.run_dir={run_dir} already holds checkpoints (latest: step {latest}) and "
                        "checkpoint.resume=false: set checkpoint.overwrite=true to delete them and start afresh, "
                        "drop checkpoint.resume=false to continue that run, or choose another log.run_dir")
    return checkpointer


@dataclasses.dataclass(frozen=True)
class Poll:
    """What the loop does at the end of a step: ``save`` a checkpoint; ``stop`` (a reason) after saving."""

    save: bool
    stop: str | None


class StopWatch:
    """Stop requests and periodic-save timing for one :meth:`RLTrainer.train` call (a context manager: the signal
    handlers are installed on entry and the previous ones restored on exit).

    Args:
      every: save every this many steps (0: off).
      every_minutes: save when this many minutes passed since the last save (0: off).
      checkpointer: asked whether a preemption sync point is reached (multi-process runs).
      say: where to print notices (process 0 only).
    """

    def __init__(self, every: int, every_minutes: float, checkpointer: Checkpointer | None = None, say=None):
        import jax

        self.every = int(every)
        self.seconds = 60.0 * float(every_minutes)
        self.checkpointer = checkpointer
        self.multiprocess = jax.process_count() > 1
        self.is_main = jax.process_index() == 0
        self._say = say or (lambda msg: print(f"[jaxrl_llm] {msg}", file=sys.stderr, flush=True))
        self.requested: str | None = None  # the first signal received on this process
        self._previous: dict[int, object] = {}
        self._last_save = time.monotonic()

    # ---- signals -----------------------------------------------------------------------------------------

    def _signals(self) -> tuple[int, ...]:
        # with several processes JAX's preemption service has SIGTERM; replacing its handler would hide notices
        return (signal.SIGINT,) if self.multiprocess else (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> "StopWatch":
        if threading.current_thread() is threading.main_thread():  # Python runs handlers on the main thread only
            for sig in self._signals():
                self._previous[sig] = signal.signal(sig, self._handle)
        self._last_save = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:  # asked twice: stop now, without a checkpoint
            signal.signal(signum, signal.SIG_DFL)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.requested = name
        self._say(f"{name} received: saving a checkpoint at the end of this step, then stopping "
                  f"(send {name} again to stop at once, without saving)")

    # ---- the end of a step -------------------------------------------------------------------------------

    def _preempted(self, step: int) -> bool:
        if not self.multiprocess or self.checkpointer is None:
            return False
        try:
            return bool(self.checkpointer.reached_preemption(step))
        except RuntimeError:  # the preemption service is off (jax_enable_preemption_service=False)
            return False

    def poll(self, step: int) -> Poll:
        """Whether to save at the end of ``step``, and whether to stop. With several processes every one must
        call it at every step (it holds collectives) and all get the same answer."""
        preempted = self._preempted(step)
        due_by_time = self.seconds > 0 and time.monotonic() - self._last_save >= self.seconds
        local_stop = self.requested is not None
        if self.multiprocess:  # agree: any process's signal stops all; process 0's clock decides the timed save
            from jax.experimental import multihost_utils

            flags = np.asarray(multihost_utils.process_allgather(np.array([local_stop, due_by_time], np.int32)))
            local_stop, due_by_time = bool(flags[:, 0].any()), bool(flags[0, 1])
        stop = None
        if preempted:
            stop = "preemption notice"
        elif local_stop:
            stop = self.requested or "a signal to another process"
        due_by_steps = self.every > 0 and step % self.every == 0
        return Poll(save=bool(stop) or due_by_steps or due_by_time, stop=stop)

    def saved(self) -> None:
        """Restart the clock of the timed saves (call after each save)."""
        self._last_save = time.monotonic()
