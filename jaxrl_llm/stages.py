"""Which stages of a multi-stage job can be reused when it runs again in the same directory.

``<run_dir>/stages.json`` records, for every stage that started, a fingerprint of the settings it ran with and
whether it finished. Running again, a stage is

* **reused** when it finished with the same fingerprint, no earlier stage was recomputed and ``redo`` does not
  name it or an earlier stage;
* **resumed** when it started with the same fingerprint (and the same conditions) but did not finish: a stage
  that checkpoints (RL) continues from its checkpoint;
* **recomputed** from scratch otherwise, and then every later stage is too (their inputs changed).

The file is replaced atomically after every change, so a job killed at any point leaves a consistent record.
"""
from __future__ import annotations

import hashlib
import json
import os

__all__ = ["StageLog", "fingerprint"]


def fingerprint(settings) -> str:
    """A short hash of JSON-able ``settings``."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StageLog:
    """Decisions about ``stages`` (in order) of the job in ``run_dir``; ``redo``: a stage to recompute with all
    later ones (``"all"``: every stage; None: reuse what can be)."""

    def __init__(self, run_dir: str, stages: tuple[str, ...], redo: str | None = None):
        self.path = os.path.join(run_dir, "stages.json")
        self.stages = stages
        self._redo_from = 0 if redo == "all" else (stages.index(redo) if redo else len(stages))
        self._recomputed = False
        try:
            with open(self.path, encoding="utf-8") as f:
                self._record = json.load(f)
        except (OSError, json.JSONDecodeError):
            self._record = {}

    def decide(self, stage: str, settings) -> str:
        """``"reuse"``, ``"resume"`` or ``"fresh"`` for ``stage`` with these settings (recorded as started unless
        reused)."""
        key = fingerprint(settings)
        old = self._record.get(stage, {})
        same = (old.get("fingerprint") == key and not self._recomputed
                and self.stages.index(stage) < self._redo_from)
        if same and old.get("done"):
            return "reuse"
        decision = "resume" if same else "fresh"
        if decision == "fresh":
            self._recomputed = True
        self._write(stage, {"fingerprint": key, "done": False})
        return decision

    def done(self, stage: str) -> None:
        self._write(stage, dict(self._record[stage], done=True))

    def _write(self, stage: str, entry: dict) -> None:
        self._record[stage] = entry
        if self._recomputed:  # later stages ran on other inputs: forget them
            later = self.stages[self.stages.index(stage) + 1:]
            self._record = {k: v for k, v in self._record.items() if k not in later}
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self._record, f, indent=1)
        os.replace(tmp, self.path)
