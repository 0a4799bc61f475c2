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
    """Seeded, shuffled, endlessly repeated, process-sharded batches of rows, with a checkpointable position."""

    def __init__(self, rows: list[dict], batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
        if not rows:
            raise ValueError("the dataset is empty")
        ds = grain.MapDataset.source(rows)
        if shuffle:
            ds = ds.shuffle(seed=seed)
        ds = ds[process_index::process_count]
        if len(ds) == 0:
            raise ValueError(f"process {process_index} of {process_count} has no rows ({len(rows)} rows in all)")
        self.batch_size = batch_size
        self._iter = ds.repeat().to_iter_dataset().__iter__()

    def next_batch(self) -> list[dict]:
        return [next(self._iter) for _ in range(self.batch_size)]

    def get_state(self) -> dict:
        return dict(self._iter.get_state())

    def set_state(self, state: dict) -> None:
        self._iter.set_state(state)


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
            raise ValueError(f"prompt {i} has {len(row)} tokens, more than data.max_prompt_tokens={max_len}: "
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
