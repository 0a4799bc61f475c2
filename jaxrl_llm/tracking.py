"""Run tracking: metrics to JSONL and TensorBoard, and a progress bar on the terminal.

Only process 0 of a multi-process run writes or prints; the others get a logger that does nothing, so the
training loop never has to ask which process it is.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping

__all__ = ["MetricsLogger", "Progress", "read_jsonl", "truncate_after"]


class MetricsLogger:
    """Appends one JSON object per call to ``<run_dir>/metrics.jsonl`` and mirrors scalars to TensorBoard.

    ``keep_through``: the step the run continues from (the restored checkpoint's, 0 for a fresh start). Rows of
    later steps, written by an earlier attempt that got further than its last checkpoint, are dropped from the
    file before anything new is written (and TensorBoard purges its events after that step), so every step has
    exactly one row. ``None`` keeps the file as it is.
    """

    def __init__(self, run_dir: str, *, jsonl: bool = True, tensorboard: bool = True, enabled: bool = True,
                 filename: str = "metrics.jsonl", keep_through: int | None = None):
        self.enabled = enabled
        self.run_dir = run_dir
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, filename)
        if jsonl:
            if keep_through is not None:
                truncate_after(path, keep_through)
            self._jsonl = open(path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = None if keep_through is None else keep_through + 1
            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=purge)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: _to_float(v) for k, v in metrics.items()}
        if self._jsonl is not None:
            record = {"step": int(step), "time": time.time(), **{k: _json_safe(v) for k, v in clean.items()}}
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in clean.items():
                if value is not None and math.isfinite(value):
                    self._tb.add_scalar(key, value, int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


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


def truncate_after(path: str, step: int) -> int:
    """Drop the rows of ``path`` whose step is greater than ``step`` (and a torn last line, as a kill in the middle
    of a write leaves); returns how many rows were dropped. The file is replaced atomically, so a crash here
    leaves either the old or the new file."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                dropped += bool(line.strip())
                continue
            if isinstance(row, dict) and int(row.get("step", 0)) > step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


def read_jsonl(path: str) -> list[dict]:
    """Read a metrics file written by :class:`MetricsLogger`."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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
