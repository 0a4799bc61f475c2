"""Sampling with the trainer's own model code: a jitted prefill + decode loop, scoring, mismatch metrics."""
from jaxrl_llm.sampling.consistency import mismatch_metrics
from jaxrl_llm.sampling.filters import SamplingParams, filter_logits, sample_tokens
from jaxrl_llm.sampling.sampler import (FINISH_LENGTH, FINISH_STOP, Rollout, Sampler, decode_logprobs,
                                       teacher_forced_logprobs, values_with_gradient)
from jaxrl_llm.sampling.score import (layer_entropies, rollout_logprobs, rollout_logprobs_program, routing_agreement,
                                     score, sequence_logprobs)

__all__ = ["FINISH_LENGTH", "FINISH_STOP", "Rollout", "Sampler", "SamplingParams", "decode_logprobs", "filter_logits",
           "layer_entropies", "mismatch_metrics", "rollout_logprobs", "rollout_logprobs_program", "routing_agreement",
           "sample_tokens", "score", "sequence_logprobs", "teacher_forced_logprobs", "values_with_gradient"]
