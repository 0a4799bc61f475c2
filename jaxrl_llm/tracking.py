"""Run tracking: metrics to JSONL, TensorBoard and (optionally) Weights & Biases, and a progress bar.

Only process 0 of a multi-process run writes or prints; the others get a logger that does nothing, so the
training loop never has to ask which process it is. The run directory may be a URI (:mod:`jaxrl_llm.paths`):
object stores cannot append, so a URI's ``metrics.jsonl`` is held in memory and rewritten whole at most every
``flush_seconds`` and on close (a resumed run first reads the rows already there).
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping

from jaxrl_llm import paths

__all__ = ["MetricsLogger", "Progress", "read_jsonl", "read_metrics", "JsonlWriter", "WandbLogger", "drop_after"]


class JsonlWriter:
    """Appends JSON lines to a local file, or keeps a URI's lines and rewrites the object when flushed.

    ``keep_through``: the step the run continues from; rows of later steps (written by an earlier attempt that got
    further than its last checkpoint) are dropped before anything new is written, so every step has one row."""

    def __init__(self, path: str, *, flush_seconds: float = 10.0, keep_through: int | None = None):
        self.path = path
        self.flush_seconds = flush_seconds
        self._local = paths.local_path(path) if not paths.is_uri(path) else None
        if self._local is not None:
            if keep_through is not None and os.path.exists(self._local):
                with open(self._local, encoding="utf-8") as f:
                    lines = f.readlines()
                kept = drop_after(lines, keep_through)
                if len(kept) != len(lines):  # replaced atomically: a crash here leaves the old or the new file
                    with open(f"{self._local}.tmp", "w", encoding="utf-8") as f:
                        f.writelines(kept)
                    os.replace(f"{self._local}.tmp", self._local)
            self._file = open(self._local, "a", encoding="utf-8")
            return
        self._lines = paths.read_text(path).splitlines(keepends=True) if paths.exists(path) else []
        if keep_through is not None:
            self._lines = drop_after(self._lines, keep_through)
        elif self._lines and not self._lines[-1].endswith("\n"):
            self._lines[-1] += "\n"
        self._flushed = time.monotonic()

    def write(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        if self._local is not None:
            self._file.write(line)
            self._file.flush()
            return
        self._lines.append(line)
        if time.monotonic() - self._flushed >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self._local is None:
            paths.write_text(self.path, "".join(self._lines))
            self._flushed = time.monotonic()

    def close(self) -> None:
        if self._local is not None:
            self._file.close()
        else:
            self.flush()


class WandbLogger:
    """Weights & Biases, imported only when asked for (``pip install 'jaxrl_llm[wandb]'``). The run id is kept in
    ``<run_dir>/wandb_id`` so that a resumed training continues the same W&B run."""

    def __init__(self, run_dir: str, *, project: str | None, entity: str | None = None, name: str | None = None,
                 config: dict | None = None):
        try:
            import wandb
        except ImportError:
            raise ImportError("log.wandb=true needs the wandb package: pip install 'jaxrl_llm[wandb]'") from None
        id_file = paths.join(run_dir, "wandb_id")
        if paths.exists(id_file):
            run_id = paths.read_text(id_file).strip()
        else:
            run_id = wandb.util.generate_id() if hasattr(wandb, "util") else f"{int(time.time() * 1e3):x}"
            paths.write_text(id_file, run_id + "\n")
        local_dir = paths.local_path(run_dir)
        self._run = wandb.init(project=project, entity=entity, name=name or paths.basename(run_dir), id=run_id,
                               resume="allow", config=config or {}, dir=local_dir)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log(dict(metrics), step=int(step))

    def close(self) -> None:
        self._run.finish()


class MetricsLogger:
    """Writes one JSON object per call to ``<run_dir>/metrics.jsonl`` and mirrors scalars to TensorBoard and,
    with ``wandb``, to Weights & Biases.

    ``keep_through``: the step the run continues from (the restored checkpoint's, 0 for a fresh start). Rows of
    later steps are dropped from the file first (and TensorBoard purges its events after that step), so every step
    has exactly one row. ``None`` keeps the file as it is."""

    def __init__(self, run_dir: str, *, jsonl: bool = True, tensorboard: bool = True, enabled: bool = True,
                 filename: str = "metrics.jsonl", wandb: bool = False, wandb_project: str | None = None,
                 wandb_entity: str | None = None, wandb_config: dict | None = None, flush_seconds: float = 10.0,
                 keep_through: int | None = None):
        self.enabled = enabled
        self.run_dir = run_dir
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        paths.makedirs(run_dir)
        if jsonl:
            self._jsonl = JsonlWriter(paths.join(run_dir, filename), flush_seconds=flush_seconds,
                                      keep_through=keep_through)
        if tensorboard:
            purge = None if keep_through is None else keep_through + 1
            self._tb = paths.tensorboard_writer(paths.join(run_dir, "tensorboard"), purge_step=purge)
        if wandb:
            self._wandb = WandbLogger(run_dir, project=wandb_project, entity=wandb_entity, config=wandb_config)

    @classmethod
    def for_run(cls, cfg, *, enabled: bool = True, keep_through: int | None = None) -> "MetricsLogger":
        """The logger a training run's ``log`` section asks for."""
        from jaxrl_llm.config import to_dict

        log = cfg.log
        return cls(log.run_dir, jsonl=log.jsonl, tensorboard=log.tensorboard, enabled=enabled, wandb=log.wandb,
                   wandb_project=log.wandb_project, wandb_entity=log.wandb_entity,
                   wandb_config=to_dict(cfg) if log.wandb else None, keep_through=keep_through)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: _to_float(v) for k, v in metrics.items()}
        if self._jsonl is not None:
            self._jsonl.write({"step": int(step), "time": time.time(),
                               **{k: _json_safe(v) for k, v in clean.items()}})
        if self._tb is not None:
            for key, value in clean.items():
                if value is not None and math.isfinite(value):
                    self._tb.add_scalar(key, value, int(step))
        if self._wandb is not None:
            self._wandb.log(step, {k: v for k, v in clean.items() if v is not None})

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None


class Progress:
    """A rich progress bar with a few live figures (reward, KL, tokens/s ...)."""

    def __init__(self, total: int, description: str, *, enabled: bool = True, start: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as _Progress, TextColumn, \
            TimeElapsedColumn, TimeRemainingColumn

        self._bar = _Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        )
        self._bar.start()
        self._task = self._bar.add_task(description, total=total, completed=start, info="")

    def update(self, advance: int = 1, **figures: float) -> None:
        if not self.enabled:
            return
        info = "  ".join(f"{k}={_fmt(v)}" for k, v in figures.items())
        self._bar.update(self._task, advance=advance, info=info)

    def close(self) -> None:
        if self.enabled:
            self._bar.stop()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def drop_after(lines: list[str], step: int) -> list[str]:
    """The metrics lines of steps up to ``step`` (a torn last line, as a kill in the middle of a write leaves, is
    dropped too)."""
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not (isinstance(row, dict) and int(row.get("step", 0)) > step):
            kept.append(line if line.endswith("\n") else line + "\n")
    return kept


def read_jsonl(path: str) -> list[dict]:
    """Read a metrics file written by :class:`MetricsLogger` (a local path or a URI)."""
    with paths.open(path, "r") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics file, one per step in step order: when a run was resumed from a checkpoint older
    than its last logged step, the steps it ran again are logged twice and the later row is kept."""
    by_step: dict[int, dict] = {}
    for row in read_jsonl(path):
        by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def _to_float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _json_safe(value: float | None):
    if value is None or math.isfinite(value):
        return value
    return str(value)  # JSON has no NaN/inf


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
