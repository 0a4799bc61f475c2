"""Built-in rewards (registered by name for ``reward.fns``) and the DAPO overlong length shaping.

``exact_int``   1.0 when the integer after a final-answer marker equals the reference answer.
``task``        ``exact_int`` with the arithmetic task's marker ``#`` (the first marker counts, as in its scorer).
``format``      1.0 when the completion matches a regex, and/or holds the required ``<tag>...</tag>`` blocks.
``gym``         reasoning-gym's own verifier for rows of ``data.source=gym``.
``math_verify`` mathematical equivalence of the final answer to the reference (:class:`MathVerifier`).
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from jaxrl_llm.rewards.base import register_reward
from jaxrl_llm.rewards.math import MathVerifier

__all__ = ["exact_int_reward", "format_reward", "overlong_penalty"]


def exact_int_reward(marker: str = "#", which: str = "last", answer_key: str = "answer"):
    """Reward fn: 1.0 when the integer right after ``marker`` (``which`` = first or last occurrence) equals the
    integer reference answer; a missing marker or a non-integer reference scores 0."""
    if which not in ("first", "last"):
        raise ValueError(f"which must be 'first' or 'last', got {which!r}")
    if not marker:
        raise ValueError("marker must be a non-empty string")
    pattern = re.compile(re.escape(marker) + r"\s*(-?\d+)")

    def exact_int(prompts, completions, **columns):
        golds = columns.get(answer_key)
        if golds is None:
            raise ValueError(f"exact_int needs column {answer_key!r}; columns: {sorted(columns)}")
        out = []
        for completion, gold in zip(completions, golds):
            found = pattern.findall(completion)
            try:
                target = int(str(gold).strip())
            except ValueError:
                out.append(0.0)
                continue
            out.append(float(bool(found) and int(found[0 if which == "first" else -1]) == target))
        return out

    return exact_int


def format_reward(pattern: str | None = r"#\s*-?\d+\s*$", tags: Sequence[str] = (), mode: str = "search"):
    """Reward fn: 1.0 when the completion satisfies the format, else 0.0.

    ``pattern`` is a regex applied with ``re.search`` (``mode="search"``) or ``re.fullmatch`` (``"fullmatch"``),
    DOTALL (``None`` skips it); the default asks for a final ``#<integer>``. Each name in ``tags`` requires a
    ``<tag>...</tag>`` block, in the given order (e.g. ``["think", "answer"]``).
    """
    if mode not in ("search", "fullmatch"):
        raise ValueError(f"mode must be 'search' or 'fullmatch', got {mode!r}")
    if pattern is None and not tags:
        raise ValueError("format reward needs a pattern or tags")
    regex = re.compile(pattern, re.DOTALL) if pattern is not None else None
    if tags:
        tag_re = re.compile(".*?".join(rf"<{re.escape(t)}>.*?</{re.escape(t)}>" for t in tags), re.DOTALL)

    def fmt(prompts, completions, **_):
        out = []
        for c in completions:
            ok = regex is None or (regex.search(c) if mode == "search" else regex.fullmatch(c)) is not None
            ok = ok and (not tags or tag_re.search(c) is not None)
            out.append(float(ok))
        return out

    return fmt


register_reward("exact_int")(exact_int_reward)
register_reward("format")(format_reward)


@register_reward("task")
def _task_reward(marker: str = "#", answer_key: str = "answer"):
    return exact_int_reward(marker=marker, which="first", answer_key=answer_key)


@register_reward("gym")
def _gym_reward(marker: str = "#"):
    """reasoning-gym's verifier for rows from ``data.source=gym`` (column ``gym_entry``)."""
    from jaxrl_llm.tasks.gym import score_gym

    def gym(prompts, completions, *, gym_entry, **_):
        return [score_gym(c, e, marker) for c, e in zip(completions, gym_entry, strict=True)]

    return gym


@register_reward("math_verify")
def _math_verify_reward(workers: int | None = None, item_timeout: float = 5.0, answer_key: str = "answer"):
    return MathVerifier(workers=workers, item_timeout=item_timeout, answer_key=answer_key)


def overlong_penalty(lengths, max_len: int, cache_len: int) -> np.ndarray:
    """DAPO soft overlong punishment per response, in tokens (float32 numpy, same shape as ``lengths``)::

        R(L) = 0                                  L <= max_len - cache_len
               ((max_len - cache_len) - L) / cache_len   max_len - cache_len < L <= max_len
               -1                                 L > max_len

    so the penalty falls linearly from 0 to -1 over the last ``cache_len`` tokens of the budget.
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    lengths = np.asarray(lengths)
    if lengths.size and (not np.issubdtype(lengths.dtype, np.number) or (lengths < 0).any()):
        raise ValueError("lengths must be non-negative token counts")
    start = max_len - cache_len
    return np.clip((start - lengths.astype(np.float64)) / cache_len, -1.0, 0.0).astype(np.float32)
