"""Prompt data: grain pipelines over JSONL / Parquet files, generated tasks and Python iterables.

Every source becomes a list of row dicts with at least ``prompt`` and ``answer`` (other columns are passed to
reward functions). :class:`PromptStream` shuffles them with a seed, repeats forever, shards them across processes
(each process reads only its own rows) and hands out fixed-size batches. Its position is a small dict
(:meth:`PromptStream.get_state`) saved in checkpoints, so a resumed run sees exactly the batches it would have.
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterable

import grain
import numpy as np

from jaxrl_llm.errors import DataError

__all__ = ["read_jsonl", "read_parquet", "from_generator", "PromptStream", "tokenize_prompts", "load_rows"]


def _check_rows(rows: list[dict], where: str, prompt_key: str, answer_key: str) -> list[dict]:
    if not rows:
        raise ValueError(f"{where} holds no rows: the dataset is empty")
    out = []
    for i, row in enumerate(rows):
        if prompt_key not in row:
            raise ValueError(f"{where}: row {i} has no {prompt_key!r} column (columns: {sorted(row)})")
        new = dict(row)
        new["prompt"] = str(row[prompt_key])
        new["answer"] = "" if row.get(answer_key) is None else str(row.get(answer_key))
        out.append(new)
    return out


def read_jsonl(path: str, *, prompt_key: str = "prompt", answer_key: str = "answer") -> list[dict]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({err})") from err
    return _check_rows(rows, path, prompt_key, answer_key)


def read_parquet(path: str, *, prompt_key: str = "prompt", answer_key: str = "answer") -> list[dict]:
    import pyarrow.parquet as pq

    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    return _check_rows(pq.read_table(path).to_pylist(), path, prompt_key, answer_key)


def from_generator(fn: Callable[[], Iterable[dict]], n: int, *, prompt_key: str = "prompt",
                   answer_key: str = "answer") -> list[dict]:
    """The first ``n`` rows of a Python generator function (materialised, so the stream can be checkpointed)."""
    return _check_rows(list(itertools.islice(fn(), n)), getattr(fn, "__name__", "generator"), prompt_key,
                       answer_key)


class PromptStream:
    """Seeded, shuffled, endlessly repeated batches of rows (a new order every epoch), with a checkpointable
    position.

    Rows are read by random access, so a process can read only the rows of each global batch it needs
    (``next_batch(positions)``): every process sees the same global batch order whatever its share.
    """

    def __init__(self, rows: list[dict], batch_size: int, *, seed: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not rows:
            raise ValueError("the dataset is empty")
        ds = grain.MapDataset.source(rows)
        if shuffle:
            ds = ds.shuffle(seed=seed)
        self.batch_size = batch_size
        self._ds = ds.repeat()  # random access into the endless sequence of reshuffled epochs
        self._batch = 0

    def next_batch(self, positions=None) -> list[dict]:
        """The next global batch, or only its rows at ``positions`` (indices within the batch, in that order)."""
        start = self._batch * self.batch_size
        self._batch += 1
        wanted = range(self.batch_size) if positions is None else positions
        for i in wanted:
            if not 0 <= i < self.batch_size:
                raise IndexError(f"position {i} is outside a batch of {self.batch_size}")
        return [self._ds[start + int(i)] for i in wanted]

    def get_state(self) -> dict:
        return {"batches": self._batch}

    def set_state(self, state: dict) -> None:
        self._batch = int(state["batches"])


def tokenize_prompts(tokenizer, prompts: list[str], max_len: int, *, chat_template: bool = False):
    """Left-padded ``(ids [B, max_len] int32, mask [B, max_len] bool)``; a prompt longer than ``max_len`` is an
    error naming it."""
    texts = prompts
    if chat_template:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids = np.full((len(texts), max_len), tokenizer.pad_token_id or 0, np.int32)
    mask = np.zeros((len(texts), max_len), bool)
    for i, row in enumerate(encoded):
        if len(row) > max_len:
            raise DataError(f"prompt {i} has {len(row)} tokens, more than data.max_prompt_tokens={max_len}: "
                            f"{prompts[i][:80]!r}")
        if not row:
            raise ValueError(f"prompt {i} is empty")
        ids[i, max_len - len(row):] = row
        mask[i, max_len - len(row):] = True
    return ids, mask


def load_rows(data_cfg) -> list[dict]:
    """Rows for a :class:`jaxrl_llm.config.DataSection`."""
    if data_cfg.source == "jsonl":
        return read_jsonl(data_cfg.path, prompt_key=data_cfg.prompt_key, answer_key=data_cfg.answer_key)
    if data_cfg.source == "parquet":
        return read_parquet(data_cfg.path, prompt_key=data_cfg.prompt_key, answer_key=data_cfg.answer_key)
    if data_cfg.source == "gym":
        from jaxrl_llm.tasks.gym import gym_rows

        kwargs = dict(data_cfg.task_kwargs)
        return gym_rows(data_cfg.task, seed=data_cfg.seed, size=int(kwargs.pop("size", 1000)), **kwargs)
    if data_cfg.task != "arith":
        raise ValueError(f"data.task: unknown task {data_cfg.task!r}; available: arith")
    from jaxrl_llm.tasks import ArithTask

    kwargs = dict(data_cfg.task_kwargs)
    count = int(kwargs.pop("num_problems", 20000))
    difficulties = kwargs.pop("difficulties", None)
    task = ArithTask(**kwargs)
    problems = task.split("train", count, seed=data_cfg.seed,
                          difficulties=tuple(difficulties) if difficulties else None)
    return [p.as_row() for p in problems]
