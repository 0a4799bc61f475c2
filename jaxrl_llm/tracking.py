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

__all__ = ["MetricsLogger", "Progress", "read_jsonl"]


class MetricsLogger:
    """Appends one JSON object per call to ``<run_dir>/metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str, *, jsonl: bool = True, tensorboard: bool = True, enabled: bool = True,
                 filename: str = "metrics.jsonl"):
        self.enabled = enabled
        self.run_dir = run_dir
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if jsonl:
            self._jsonl = open(os.path.join(run_dir, filename), "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

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
