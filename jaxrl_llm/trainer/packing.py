"""Packing the responses of shared-prompt groups into fewer, fuller rows for the update's forward.

The ``n`` responses of one prompt differ in length, and padded to the longest one most of an update's arithmetic
can go to padding. A packed row holds several responses of one group side by side, each a segment that sees its
group's prompt (through the prompt's shared keys/values) and its own earlier tokens only, so the forward runs over
about ``sum(lengths)`` response tokens instead of ``rows x R``. The plan is made on the host for each minibatch;
:func:`jaxrl_llm.sampling.score.sequence_logprobs` applies it and returns log-probs in the usual ``[rows, R]``.
"""
from __future__ import annotations

import math

import flax
import jax
import numpy as np

__all__ = ["Packing", "plan_packing", "packed_rows", "packed_rows_multiple"]


def packed_rows_multiple(row_shards: int, micro_rows: int) -> int:
    """The step in which packed rows per micro-batch are counted: a multiple of 8 and of the row shards, and at
    least 1/8 of the micro-batch, so that a run compiles at most about 8 update shapes whatever its batch size
    (a micro-batch packs into at most ``micro_rows`` rows)."""
    base = math.lcm(8, row_shards)
    return base * max(1, -(-micro_rows // (8 * base)))


def packed_rows(needed: int, step: int) -> int:
    """Packed rows a micro-batch gets when it needs ``needed``: at least one, rounded up to a multiple of ``step``
    (the memory planner's worst case is ``needed`` = the micro-batch's rows)."""
    return math.ceil(max(needed, 1) / step) * step


@flax.struct.dataclass
class Packing:
    """Where each response token sits in the packed layout of its micro-batch.

    Packed leaves have ``num_micro * packed_rows`` rows, ``back`` has the minibatch's rows, so splitting every leaf
    into micro-batches along axis 0 (``split_micro``) gives each micro-batch its own plan.
    """

    src: jax.Array  # int32 [M * Rp, W]: flat index ``row * R + t`` (in the micro-batch) of the token in each slot
    offset: jax.Array  # int32 [M * Rp, W]: t, the token's index in its response (0 in empty slots)
    segment: jax.Array  # int32 [M * Rp, W]: 1, 2, ... per response in the packed row; 0 = empty slot
    group: jax.Array  # int32 [M * Rp]: the micro-batch's prompt group each packed row belongs to
    back: jax.Array  # int32 [N, R]: flat index ``packed_row * W + slot`` of each response token (0 if unused)


def _response_lengths(mask: np.ndarray) -> np.ndarray:
    """Tokens up to the last one that enters the loss (response masks are prefixes: ``t < length``)."""
    r = mask.shape[1]
    last = r - np.argmax(mask[:, ::-1], axis=1)
    return np.where(mask.any(axis=1), last, 0)


def plan_packing(mask: np.ndarray, *, group: int, num_micro: int, row_multiple: int = 8) -> Packing:
    """Pack the responses of ``mask [N, R]`` (rows in groups of ``group`` sharing a prompt, ``num_micro`` equal
    micro-batches of whole groups) first-fit by decreasing length into rows of width ``R``.

    Every micro-batch gets the same number of packed rows: the largest need, rounded up to ``row_multiple`` (a
    multiple of the row shards; few distinct shapes mean few compilations).
    """
    mask = np.asarray(mask, bool)
    n_rows, width = mask.shape
    if n_rows % num_micro or (n_rows // num_micro) % group:
        raise ValueError(f"{n_rows} rows do not split into {num_micro} micro-batches of whole groups of {group}")
    lengths = _response_lengths(mask)
    per_micro = n_rows // num_micro
    layouts = []  # per micro-batch: list of (group, [(row, length), ...]) packed rows
    for m in range(num_micro):
        packed = []
        for g in range(per_micro // group):
            bins: list[list] = []  # [segments, used]
            members = sorted(range(g * group, (g + 1) * group), key=lambda row: -lengths[m * per_micro + row])
            for row in members:
                length = int(lengths[m * per_micro + row])
                if length == 0:
                    continue
                fit = next((b for b in bins if b[1] + length <= width), None)
                if fit is None:
                    fit = [[], 0]
                    bins.append(fit)
                fit[0].append((row, length))
                fit[1] += length
            packed += [(g, segments) for segments, _ in bins]
        layouts.append(packed)
    rows_p = packed_rows(max(len(p) for p in layouts), row_multiple)
    src = np.zeros((num_micro, rows_p, width), np.int32)
    offset = np.zeros_like(src)
    segment = np.zeros_like(src)
    groups = np.zeros((num_micro, rows_p), np.int32)
    back = np.zeros((num_micro, per_micro, width), np.int32)
    for m, packed in enumerate(layouts):
        for i, (g, segments) in enumerate(packed):
            groups[m, i] = g
            start = 0
            for s, (row, length) in enumerate(segments, start=1):
                t = np.arange(length)
                src[m, i, start:start + length] = row * width + t
                offset[m, i, start:start + length] = t
                segment[m, i, start:start + length] = s
                back[m, row, :length] = i * width + start + t
                start += length
    return Packing(src=src.reshape(-1, width), offset=offset.reshape(-1, width),
                   segment=segment.reshape(-1, width), group=groups.reshape(-1), back=back.reshape(-1, width))
