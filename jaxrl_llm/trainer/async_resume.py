"""Exact resume of one-step-off-policy (async) runs.

In async mode the next step's rollouts are in the making while a step trains: they were sampled, or are being
sampled, from the weights *before* that step's update, starting from a data position and PRNG key that the
in-flight sampling has already moved on. A checkpoint that saved the live position, key and weights would make
the resumed run skip a batch and sample it from newer weights. So an async checkpoint saves the
:class:`ResumePoint` of the rollouts in the making (data position and key before they were drawn, and the weights
they are drawn from, as ``sampler_params``), and a resumed run samples them again from there: the same rollouts
as the uninterrupted run, bit for bit. The cost is one more copy of the parameters (not of the optimizer state)
in async checkpoints.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

__all__ = ["ResumePoint", "checkpoint_entries"]


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """Where the rollouts in the making start: data-stream state, PRNG key, and the parameters they are
    sampled with."""

    data: dict
    key: jax.Array
    params: Any

    @classmethod
    def of(cls, stream, key, sampler_state) -> "ResumePoint":
        """The point before drawing from ``stream`` with ``key`` and the merged model state ``sampler_state``."""
        params, _ = nnx.split_state(sampler_state, nnx.Param, ...)
        return cls(stream.get_state(), key, params)


def checkpoint_entries(point: ResumePoint | None, params, replicated) -> dict:
    """The checkpoint entries of an async run: the resume point's key and sampler parameters (the live
    parameters as a placeholder of the same structure when nothing is in the making)."""
    if point is None:
        return {"sampler_params": params}
    return {"key": jax.device_put(jax.random.key_data(point.key), replicated), "sampler_params": point.params}
