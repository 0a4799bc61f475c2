"""Stop a run whose reward function keeps failing, instead of training on zeros.

A reward item that raises, times out or returns a non-finite score scores 0 and counts as a failure
(``reward_failed/<name>`` in the metrics, out of ``reward_items``). When a function's failures over the last
``reward.failure_window`` steps exceed ``reward.max_failure_frac`` of the items it scored there, the run stops
with :class:`jaxrl_llm.errors.RewardFailure` carrying the traceback of that function's first error. Occasional
failures (a malformed answer, one slow item) stay below the fraction and only show in the metrics.
"""
from __future__ import annotations

import collections

from jaxrl_llm.errors import RewardFailure

__all__ = ["RewardMonitor"]


class RewardMonitor:
    """Failure fractions of each reward function over a window of steps.

    ``first_errors`` (name -> text) is filled by :func:`jaxrl_llm.rewards.compute_rewards` (its ``first_errors``
    argument) with the first traceback, or timeout, of each function.
    """

    def __init__(self, names, *, max_failure_frac: float = 0.5, window: int = 3):
        self.names = list(names)
        self.max_failure_frac = float(max_failure_frac)
        self.first_errors: dict[str, str] = {}
        self._recent: collections.deque = collections.deque(maxlen=int(window))

    def inspect(self, step: int, metrics: dict) -> RewardFailure | None:
        """Record a step's ``reward_items`` and ``reward_failed/<name>``; the reason to stop, if any. At the start
        the window holds fewer steps: a function failing on most items of the first step stops the run there."""
        self._recent.append((float(metrics.get("reward_items", 0.0)),
                             {n: float(metrics.get(f"reward_failed/{n}", 0.0)) for n in self.names}))
        items = sum(count for count, _ in self._recent)
        for name in self.names:
            failed = sum(f[name] for _, f in self._recent)
            if items > 0 and failed / items > self.max_failure_frac:
                steps = len(self._recent)
                first = self.first_errors.get(name, "(its first failure happened on another process)")
                return RewardFailure(
                    f"reward function {name!r} failed on {failed:.0f} of {items:.0f} items over the last {steps} "
                    f"step(s) (to step {step}), more than reward.max_failure_frac={self.max_failure_frac:g}; its "
                    "first error is shown above", details=f"first failure of reward function {name!r}:\n{first}")
        return None
