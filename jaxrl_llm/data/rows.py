"""Prompt rows: the columns of a raw row mapped onto what the trainer reads, and held-out subsets.

A prompt row has

* ``prompt``: a string; for a chat row, the text of its last user turn (what reward functions see as the
  question);
* ``prompt_messages``: for chat rows only, the turns ``[{"role", "content"}, ...]`` that are rendered with the
  tokenizer's chat template (roles ``system``, ``user``, ``assistant``; the last turn is the user's);
* ``answer``: the reference answer as a string (``""`` when absent);
* every other column of the raw row, unchanged (they reach the reward functions).

A row is a chat row when its prompt column holds a list of turns, or when it has no prompt column and its
``messages`` column holds one.
"""
from __future__ import annotations

from collections.abc import Iterator

import grain

__all__ = ["PromptRows", "Subset", "split_holdout", "normalize_row", "ROLES"]

ROLES = ("system", "user", "assistant")


def _check_messages(turns, where: str) -> list[dict]:
    if not isinstance(turns, (list, tuple)) or not turns:
        raise ValueError(f"{where}: messages must be a non-empty list of {{role, content}} turns, got {turns!r:.80}")
    out = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise ValueError(f"{where}: turn {k} must be a mapping with 'role' and 'content', got {turn!r:.80}")
        if turn["role"] not in ROLES:
            raise ValueError(f"{where}: turn {k} has role {turn['role']!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(turn["content"], str):
            raise ValueError(f"{where}: turn {k} content must be text, got {type(turn['content']).__name__}")
        out.append({"role": turn["role"], "content": turn["content"]})
    if out[-1]["role"] != "user":
        raise ValueError(f"{where}: the last turn must be the user's (the model answers it), got {out[-1]['role']!r}")
    return out


def normalize_row(raw: dict, where: str, *, prompt_key: str = "prompt", answer_key: str = "answer",
                  messages_key: str = "messages") -> dict:
    """The prompt row of a raw row (see the module docstring); errors name ``where``."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a row must be a mapping of columns, got {type(raw).__name__}")
    value = raw.get(prompt_key)
    if value is None and raw.get(messages_key) is not None:
        value = raw[messages_key]
    if value is None:
        raise ValueError(f"{where}: row has no {prompt_key!r} column (nor {messages_key!r}; columns: {sorted(raw)})")
    row = dict(raw)
    if isinstance(value, (list, tuple)):
        turns = _check_messages(list(value), where)
        row["prompt_messages"] = turns
        row["prompt"] = turns[-1]["content"]
    else:
        row["prompt"] = str(value)
    answer = raw.get(answer_key)
    row["answer"] = "" if answer is None else str(answer)
    return row


class PromptRows:
    """A source's rows as prompt rows (random access, ``where``, ``iter_rows``)."""

    def __init__(self, source, *, prompt_key: str = "prompt", answer_key: str = "answer",
                 messages_key: str = "messages"):
        if len(source) == 0:
            raise ValueError(f"{source.path} holds no rows: the dataset is empty")
        self.source = source
        self.path = source.path
        self._keys = dict(prompt_key=prompt_key, answer_key=answer_key, messages_key=messages_key)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        raw = self.source[i]
        try:
            return normalize_row(raw, f"{self.path} row {i}", **self._keys)
        except ValueError:  # name the exact place (a line number costs a scan, so only when it fails)
            return normalize_row(raw, self.source.where(i), **self._keys)

    def __iter__(self) -> Iterator[dict]:
        return (row for _, row in self.iter_rows())

    def where(self, i: int) -> str:
        return self.source.where(int(i))

    def iter_rows(self) -> Iterator[tuple[str, dict]]:
        for where, raw in self.source.iter_rows():
            yield where, normalize_row(raw, where, **self._keys)

    def close(self) -> None:
        self.source.close()


class Subset:
    """The rows of ``base`` at the indices of a grain ``MapDataset`` of ints (a lazy view, no index list)."""

    def __init__(self, base, indices: grain.MapDataset, name: str):
        self.base = base
        self._indices = indices
        self.path = f"{base.path} ({name})"

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= int(i) < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        return self.base[int(self._indices[int(i)])]

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    def where(self, i: int) -> str:
        return self.base.where(int(self._indices[int(i)]))

    def iter_rows(self) -> Iterator[tuple[str, dict]]:
        for i in range(len(self)):
            yield self.where(i), self[i]

    def close(self) -> None:
        pass


def split_holdout(rows, amount: float, *, seed: int = 0) -> tuple[Subset, Subset]:
    """``(training rows, held-out rows)``: a seeded random ``amount`` of the rows (a fraction below 1, else a
    number of rows) held out, the rest for training. The permutation is grain's index shuffle: nothing of size
    ``len(rows)`` is built."""
    total = len(rows)
    count = int(round(amount * total)) if amount < 1 else int(amount)
    if not 1 <= count < total:
        raise ValueError(f"eval.split={amount} holds out {count} of {total} rows; it must leave at least one row for "
                         "training and hold out at least one")
    order = grain.MapDataset.range(total).shuffle(seed=seed)
    held = order.slice(slice(0, count))
    kept = order.slice(slice(count, total))
    return Subset(rows, kept, "training part"), Subset(rows, held, "held out")
