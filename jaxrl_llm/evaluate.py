"""Held-out evaluation: pass@k per difficulty from n sampled completions per problem."""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from jaxrl_llm.data import tokenize_prompts
from jaxrl_llm.metrics import mean_pass_at_k
from jaxrl_llm.sampling import Sampler, SamplingParams
from jaxrl_llm.tasks import score_completion

__all__ = ["evaluate_pass_at_k"]


def evaluate_pass_at_k(model, tokenizer, problems_by_difficulty: dict, *, n: int = 16, ks=(1, 2, 4, 8, 16),
                       temperature: float = 1.0, max_new_tokens: int = 64, prompt_len: int = 64,
                       batch_prompts: int = 16, seed: int = 0) -> dict[int, dict[str, float]]:
    """``{difficulty: {"pass@k": value, ..., "problems": count}}`` with the unbiased pass@k estimator."""
    ks = tuple(k for k in ks if k <= n)
    sampler = Sampler(model)
    state = nnx.state(model)
    stops = (tokenizer.eos_token_id,)
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, n=n, stop_tokens=stops)
    key = jax.random.key(seed)
    results = {}
    for difficulty, problems in sorted(problems_by_difficulty.items()):
        correct = []
        for start in range(0, len(problems), batch_prompts):
            chunk = problems[start:start + batch_prompts]
            # pad the last chunk to a fixed batch so the sampler compiles once
            padded = chunk + [chunk[-1]] * (batch_prompts - len(chunk))
            ids, mask = tokenize_prompts(tokenizer, [p.model_input for p in padded], prompt_len)
            key, sub = jax.random.split(key)
            ro = sampler.generate(state, ids, mask, params, sub)
            tokens, lengths = np.asarray(ro.tokens), np.asarray(ro.lengths)
            texts = tokenizer.batch_decode([tokens[i, :lengths[i]] for i in range(len(lengths))],
                                           skip_special_tokens=True)
            scores = np.array([score_completion(t, padded[i // n].answer) for i, t in enumerate(texts)])
            correct.append(scores.reshape(batch_prompts, n)[:len(chunk)] > 0)
        table = mean_pass_at_k(np.concatenate(correct), ks)
        results[int(difficulty)] = {**{f"pass@{k}": v for k, v in table.items()}, "problems": len(problems)}
    return results
