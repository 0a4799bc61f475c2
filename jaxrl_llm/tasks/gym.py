"""Tasks served by the ``reasoning-gym`` package (procedurally generated, verifiable), as a second prompt source.

A reasoning-gym dataset is built from its name, a seed, a size and its own keyword arguments; every entry has a
``question``, a reference ``answer`` and ``metadata``, and the dataset scores an answer string against an entry.
Rows carry the entry (as JSON, so it survives any data pipeline) in the ``gym_entry`` column; the ``gym`` reward
rebuilds the dataset from the entry's metadata and asks it for the score, so verification is reasoning-gym's own.

The model is asked to put its final answer after a marker (default ``#``, as in the arithmetic task); the reward
scores the text after the last marker (or the whole completion when there is none).

Install with ``pip install jaxrl_llm[gym]``.
"""
from __future__ import annotations

import functools
import json
from typing import Any

__all__ = ["GymTask", "gym_rows", "extract_final", "score_gym"]

DEFAULT_INSTRUCTION = "\nGive the final answer after '{marker}'."


def _rg():
    try:
        import reasoning_gym
    except ImportError:  # an optional dependency
        raise ImportError("the reasoning-gym tasks need the `reasoning-gym` package: pip install "
                          "'jaxrl_llm[gym]'") from None
    return reasoning_gym


@functools.lru_cache(maxsize=64)
def _dataset(name: str, seed: int, size: int, kwargs_json: str):
    try:
        return _rg().create_dataset(name, seed=seed, size=size, **json.loads(kwargs_json))
    except (KeyError, ValueError) as err:
        raise ValueError(f"reasoning-gym dataset {name!r} with {kwargs_json}: {err}") from None


class GymTask:
    """``size`` entries of reasoning-gym dataset ``name`` (deterministic for a seed)."""

    def __init__(self, name: str, *, seed: int = 0, size: int = 1000, marker: str = "#",
                 instruction: str | None = DEFAULT_INSTRUCTION, **dataset_kwargs: Any):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.name, self.seed, self.size, self.marker = name, seed, size, marker
        self.instruction = instruction
        self.dataset_kwargs = dataset_kwargs
        self.dataset = _dataset(name, seed, size, json.dumps(dataset_kwargs, sort_keys=True))

    def rows(self) -> list[dict]:
        suffix = self.instruction.format(marker=self.marker) if self.instruction else ""
        out = []
        for i in range(self.size):
            entry = self.dataset[i]
            # what the reward needs to rebuild this dataset and score against this entry
            ref = {"name": self.name, "seed": self.seed, "size": self.size, "kwargs": self.dataset_kwargs,
                   "index": i}
            out.append({"prompt": entry["question"] + suffix, "answer": str(entry["answer"]),
                        "gym_entry": json.dumps(ref, sort_keys=True)})
        return out


def gym_rows(name: str, *, seed: int = 0, size: int = 1000, **kwargs: Any) -> list[dict]:
    return GymTask(name, seed=seed, size=size, **kwargs).rows()


def extract_final(completion: str, marker: str = "#") -> str:
    """Text after the last ``marker`` (stripped), or the whole completion when there is no marker."""
    head, sep, tail = completion.rpartition(marker)
    return (tail if sep else completion).strip()


def score_gym(completion: str, gym_entry: str, marker: str = "#") -> float:
    """reasoning-gym's own score of the completion's final answer for the row's entry."""
    ref = json.loads(gym_entry)
    dataset = _dataset(ref["name"], ref["seed"], ref["size"], json.dumps(ref["kwargs"], sort_keys=True))
    return float(dataset.score_answer(extract_final(completion, marker), dataset[ref["index"]]))
