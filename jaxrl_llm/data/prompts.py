"""Prompt rows to model inputs: chat-template rendering, tokenisation, left padding, truncation, and the pass over
every prompt at start that validates them and measures the longest.

Rendering a row (:meth:`PromptEncoder.render`):

* a plain prompt without ``chat_template`` is used as it is;
* otherwise the turns (the row's ``prompt_messages``, or one user turn holding its prompt), preceded by a system
  turn holding ``system_prompt`` when one is configured and the conversation has none, go through
  ``tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True, **template_kwargs)``, e.g.
  ``template_kwargs={"enable_thinking": False}`` for Qwen3's template.

Lengths: a prompt of ``L`` tokens is left-padded to ``max_tokens``. ``L > max_tokens`` is an error naming the row,
or with ``truncate="left"`` the first ``L - max_tokens`` tokens are dropped (the end, with the generation
prompt, is kept), with ``truncate="right"`` the last ones.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["PromptEncoder", "PromptScan", "scan_prompts", "tokenize_prompts", "round_up"]

TRUNCATE = ("error", "left", "right")
LENGTH_MULTIPLE = 16  # derived prompt lengths are rounded up to this (few distinct shapes to compile)


def round_up(n: int, multiple: int = LENGTH_MULTIPLE) -> int:
    return max(multiple, -(-int(n) // multiple) * multiple)


class PromptEncoder:
    """Renders, tokenises and pads prompt rows; ``key`` names the config section in messages (``data``)."""

    def __init__(self, tokenizer, *, chat_template: bool = False, system_prompt: str | None = None,
                 template_kwargs: dict | None = None, max_tokens: int | None = None, truncate: str = "error",
                 key: str = "data"):
        if truncate not in TRUNCATE:
            raise ValueError(f"{key}.truncate: got {truncate!r}; allowed: {', '.join(TRUNCATE)}")
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.template_kwargs = dict(template_kwargs or {})
        self.max_tokens = max_tokens
        self.truncate = truncate
        self.key = key

    @classmethod
    def of(cls, tokenizer, data_cfg, key: str = "data") -> "PromptEncoder":
        """The encoder a data section (``data`` or ``eval.data``) describes."""
        return cls(tokenizer, chat_template=data_cfg.chat_template, system_prompt=data_cfg.system_prompt,
                   template_kwargs=dict(data_cfg.chat_template_kwargs), max_tokens=data_cfg.max_prompt_tokens,
                   truncate=data_cfg.truncate, key=key)

    def with_max_tokens(self, max_tokens: int) -> "PromptEncoder":
        return PromptEncoder(
            self.tokenizer, chat_template=self.chat_template, system_prompt=self.system_prompt,
            template_kwargs=self.template_kwargs, max_tokens=max_tokens, truncate=self.truncate, key=self.key)

    def render(self, row) -> str:
        """The text the model reads for a prompt row (or a plain string, or a list of turns)."""
        if isinstance(row, str):
            row = {"prompt": row}
        elif isinstance(row, (list, tuple)):
            row = {"prompt_messages": list(row)}
        turns = row.get("prompt_messages")
        if turns is None and not self.chat_template:
            return row["prompt"]
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"{self.key}.chat_template: the tokenizer has no chat template, which chat rows "
                             "(a messages column) and chat_template=true need")
        turns = list(turns) if turns is not None else [{"role": "user", "content": row["prompt"]}]
        if self.system_prompt is not None and turns[0]["role"] != "system":
            turns = [{"role": "system", "content": self.system_prompt}] + turns
        return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True,
                                                  **self.template_kwargs)

    def token_ids(self, rows: Sequence) -> list[list[int]]:
        texts = [self.render(r) for r in rows]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def fit(self, ids: list[int], where: str) -> list[int]:
        """``ids`` within ``max_tokens``: unchanged, truncated, or an error naming ``where``."""
        if not ids:
            raise ValueError(f"{where}: the prompt is empty (0 tokens)")
        limit = self.max_tokens
        if limit is None or len(ids) <= limit:
            return ids
        if self.truncate == "left":
            return ids[len(ids) - limit:]
        if self.truncate == "right":
            return ids[:limit]
        raise ValueError(f"{where}: prompt has {len(ids)} tokens, more than {self.key}.max_prompt_tokens={limit} "
                         f"(raise it, set it to null to derive it from the data, or set {self.key}.truncate=left or "
                         "right)")

    def encode(self, rows: Sequence, where: Sequence[str] | None = None):
        """Left-padded ``(ids [B, max_tokens] int32, mask [B, max_tokens] bool)``."""
        if self.max_tokens is None:
            raise ValueError(f"{self.key}.max_prompt_tokens is not known yet: scan the data (scan_prompts) first")
        encoded = self.token_ids(rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = np.full((len(encoded), self.max_tokens), pad, np.int32)
        mask = np.zeros((len(encoded), self.max_tokens), bool)
        for i, row_ids in enumerate(encoded):
            label = where[i] if where is not None else _describe(i, rows[i])
            row_ids = self.fit(row_ids, label)
            ids[i, self.max_tokens - len(row_ids):] = row_ids
            mask[i, self.max_tokens - len(row_ids):] = True
        return ids, mask


def _describe(i: int, row) -> str:
    text = row if isinstance(row, str) else (row.get("prompt", "") if isinstance(row, dict) else str(row))
    return f"prompt {i} ({str(text)[:60]!r})"


@dataclasses.dataclass(frozen=True)
class PromptScan:
    """What a pass over every prompt found."""

    rows: int
    longest: int  # tokens of the longest prompt
    longest_where: str
    truncated: int  # prompts longer than max_tokens (cut with truncate=left/right)


def scan_prompts(rows: Iterable[tuple[str, dict]], encoder: PromptEncoder, *, chunk: int = 128) -> PromptScan:
    """Render and tokenise every ``(where, row)`` once: empty prompts and (with ``truncate="error"``) prompts longer
    than ``encoder.max_tokens`` are errors naming where they are."""
    count, longest, longest_where, truncated = 0, 0, "", 0

    def check(batch):
        nonlocal count, longest, longest_where, truncated
        for (where, _), ids in zip(batch, encoder.token_ids([row for _, row in batch])):
            encoder.fit(ids, where)
            count += 1
            if len(ids) > longest:
                longest, longest_where = len(ids), where
            truncated += encoder.max_tokens is not None and len(ids) > encoder.max_tokens

    batch = []
    for item in rows:
        batch.append(item)
        if len(batch) == chunk:
            check(batch)
            batch = []
    if batch:
        check(batch)
    return PromptScan(rows=count, longest=longest, longest_where=longest_where, truncated=truncated)


def tokenize_prompts(tokenizer, prompts: Sequence, max_len: int, *, chat_template: bool = False,
                     system_prompt: str | None = None, chat_template_kwargs: dict | None = None,
                     truncate: str = "error"):
    """Left-padded ``(ids [B, max_len] int32, mask [B, max_len] bool)`` for prompt strings, lists of turns or prompt
    rows; a prompt longer than ``max_len`` is an error naming it (or cut, see ``truncate``)."""
    encoder = PromptEncoder(tokenizer, chat_template=chat_template, system_prompt=system_prompt,
                            template_kwargs=chat_template_kwargs, max_tokens=max_len, truncate=truncate)
    return encoder.encode(list(prompts))
