"""Supervised fine-tuning on worked solutions, with the same model, scorer and optimizer code as RL.

The loss is the mean negative log-likelihood of the solution tokens (and the closing end-of-text token) given
the prompt. The result is saved as a Hugging Face checkpoint together with its tokenizer.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxrl_llm import losses as L
from jaxrl_llm.models import Decoder, save_hf
from jaxrl_llm.sampling import sequence_logprobs
from jaxrl_llm.tracking import MetricsLogger, Progress
from jaxrl_llm.trainer.optim import make_optimizer

__all__ = ["encode_sft_batch", "make_sft_step", "run_sft"]


def encode_sft_batch(tokenizer, pairs: list[tuple[str, str]], prompt_len: int, target_len: int):
    """Left-padded prompts and right-padded targets (target text + end-of-text) as int32/bool arrays."""
    b = len(pairs)
    prompt_ids = np.full((b, prompt_len), tokenizer.pad_token_id, np.int32)
    prompt_mask = np.zeros((b, prompt_len), bool)
    tokens = np.full((b, target_len), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((b, target_len), bool)
    for i, (prompt, target) in enumerate(pairs):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(p) > prompt_len or len(t) > target_len:
            raise ValueError(f"example {i} needs {len(p)} prompt / {len(t)} target tokens, more than the "
                             f"configured {prompt_len} / {target_len}")
        prompt_ids[i, prompt_len - len(p):] = p
        prompt_mask[i, prompt_len - len(p):] = True
        tokens[i, :len(t)] = t
        mask[i, :len(t)] = True
    return prompt_ids, prompt_mask, tokens, mask


def make_sft_step(graphdef, optimizer):
    def loss_fn(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        logp, _ = sequence_logprobs(model, *batch)
        return -L.aggregate(logp, batch[3], "token-mean")

    @jax.jit
    def step(params, rest, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

    return step


def run_sft(model: Decoder, tokenizer, examples: Iterator[tuple[str, str]], *, steps: int, batch_size: int,
            prompt_len: int, target_len: int, lr: float = 1e-3, warmup_steps: int = 20, weight_decay: float = 0.01,
            out_dir: str | None = None, run_dir: str | None = None, progress: bool = True,
            log_every: int = 10) -> list[float]:
    """Train ``model`` in place on ``(prompt, target)`` pairs; returns the loss of every step."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = make_optimizer(lr, steps=steps, warmup_steps=min(warmup_steps, steps - 1), schedule="cosine",
                               weight_decay=weight_decay, b2=0.98, grad_clip=1.0, final_lr_ratio=0.1)
    opt_state = optimizer.init(params)
    step_fn = make_sft_step(graphdef, optimizer)
    # a new SFT run: rows of an earlier one in the same directory are dropped
    logger = MetricsLogger(run_dir, filename="sft_metrics.jsonl", tensorboard=False, keep_through=-1) \
        if run_dir else None
    losses = []
    shown = 0  # steps already counted by the progress bar
    start = time.perf_counter()
    with Progress(steps, "sft", enabled=progress) as bar:
        for step in range(steps):
            pairs = list(itertools.islice(examples, batch_size))
            batch = tuple(jnp.asarray(x) for x in encode_sft_batch(tokenizer, pairs, prompt_len, target_len))
            params, opt_state, loss, gnorm = step_fn(params, rest, opt_state, batch)
            if step % log_every == 0 or step == steps - 1:
                value = float(loss)
                losses.append(value)
                if logger:
                    logger.log(step, {"sft_loss": value, "grad_norm": float(gnorm),
                                      "elapsed": time.perf_counter() - start})
                bar.update(advance=step + 1 - shown, loss=value)
                shown = step + 1
    nnx.update(model, params)
    if logger:
        logger.close()
    if out_dir:
        save_hf(model, out_dir, tokenizer=tokenizer)
    return losses
