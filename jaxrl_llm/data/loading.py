"""From a data section of the config to prompt rows, their encoder, and the trainer's prompt stream."""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable

from jaxrl_llm.data.prompts import PromptEncoder, PromptScan, round_up, scan_prompts
from jaxrl_llm.data.rows import PromptRows, split_holdout
from jaxrl_llm.data.sources import JsonlSource, ListSource, ParquetSource, open_file_source
from jaxrl_llm.data.stream import PromptStream

__all__ = ["load_rows", "prepare_prompts", "training_prompts", "TrainingPrompts", "read_jsonl", "read_parquet",
           "from_generator"]


def _task_rows(data_cfg, split: str) -> list[dict]:
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
    problems = task.split(split, count, seed=data_cfg.seed,
                          difficulties=tuple(difficulties) if difficulties else None)
    return [p.as_row() for p in problems]


def load_rows(data_cfg, *, split: str = "train") -> PromptRows:
    """The prompt rows of a :class:`jaxrl_llm.config.DataSection` (random access; files are not read into
    memory). ``split`` picks the generated task's split (``train`` or ``eval``)."""
    keys = dict(prompt_key=data_cfg.prompt_key, answer_key=data_cfg.answer_key,
                messages_key=getattr(data_cfg, "messages_key", "messages"))
    if data_cfg.source in ("task", "gym"):
        source = ListSource(_task_rows(data_cfg, split), f"{data_cfg.source} {data_cfg.task}")
    else:
        source = open_file_source(data_cfg.source, data_cfg.path, cache=getattr(data_cfg, "cache_dir", None),
                                  split=getattr(data_cfg, "split", "train"))
    return PromptRows(source, **keys)


def prepare_prompts(data_cfg, tokenizer, *, key: str = "data", split: str = "train"):
    """``(rows, encoder, scan)`` of a data section: with ``validate`` every prompt is rendered and tokenised once
    (errors name file and line) and, when ``max_prompt_tokens`` is null, the longest prompt rounded up to 16 sets
    it; ``scan`` is None without validation."""
    rows = load_rows(data_cfg, split=split)
    encoder = PromptEncoder.of(tokenizer, data_cfg, key)
    scan = None
    if data_cfg.validate:
        scan = scan_prompts(rows.iter_rows(), encoder)
        if encoder.max_tokens is None:
            encoder = encoder.with_max_tokens(round_up(scan.longest))
    return rows, encoder, scan


@dataclasses.dataclass
class TrainingPrompts:
    stream: PromptStream  # the training rows, batch after batch
    encoder: PromptEncoder
    holdout: object | None  # rows held out for evaluation (eval.split), or None
    scan: PromptScan | None
    rows: object = None  # the source behind both (its open files)

    def close(self) -> None:
        self.stream.close()
        if self.rows is not None:
            self.rows.close()


def training_prompts(cfg, tokenizer) -> TrainingPrompts:
    """The prompts of a training run: ``cfg.data`` validated, minus the ``eval.split`` rows held out, as a stream
    of ``train.prompts_per_step`` prompts per step."""
    source, encoder, scan = prepare_prompts(cfg.data, tokenizer)
    rows, holdout = source, None
    if cfg.eval.split is not None:
        rows, holdout = split_holdout(source, cfg.eval.split, seed=cfg.eval.seed)
    d = cfg.data
    stream = PromptStream(rows, cfg.train.prompts_per_step, seed=d.seed, shuffle=d.shuffle,
                          read_threads=d.read_threads, prefetch=d.prefetch_batches)
    return TrainingPrompts(stream=stream, encoder=encoder, holdout=holdout, scan=scan, rows=source)


# ---- whole files as lists (small data, tests) ----------------------------------------------------------------

def read_jsonl(path: str, *, prompt_key: str = "prompt", answer_key: str = "answer") -> list[dict]:
    """Every prompt row of a JSON-lines file, in a list."""
    return [row for _, row in PromptRows(JsonlSource(path), prompt_key=prompt_key, answer_key=answer_key).iter_rows()]


def read_parquet(path: str, *, prompt_key: str = "prompt", answer_key: str = "answer") -> list[dict]:
    """Every prompt row of a Parquet file, in a list."""
    return [row for _, row in PromptRows(ParquetSource(path), prompt_key=prompt_key,
                                         answer_key=answer_key).iter_rows()]


def from_generator(fn: Callable[[], Iterable[dict]], n: int, *, prompt_key: str = "prompt",
                   answer_key: str = "answer") -> list[dict]:
    """The first ``n`` rows of a Python generator function (materialised, so the stream can be checkpointed)."""
    rows = ListSource(list(itertools.islice(fn(), n)), getattr(fn, "__name__", "generator"))
    return [row for _, row in PromptRows(rows, prompt_key=prompt_key, answer_key=answer_key).iter_rows()]
