"""Activation rematerialisation per decoder layer (``model.remat``), in an order the compiler cannot undo.

``none`` keeps every activation the backward pass needs; ``full`` keeps each layer's inputs and recomputes the
layer's forward during the backward pass; ``dots`` also keeps the outputs of matrix products without batch
dimensions (the projections and MLP products), recomputing the rest (norms, rotary, attention scores).

``jax.checkpoint`` alone saves nothing on XLA:CPU when the layers are a Python loop: the recomputation depends only
on the layer's saved inputs, the optimisation barrier that pins it is removed before scheduling, and the scheduler
then runs every layer's recomputation right after the forward pass, where its results live as long as saved
activations would. Here the backward rule makes the recomputation's inputs depend on the gradient arriving at the
layer's outputs (``x + 0 * g[0]``, exact for finite gradients), so layer ``l`` is recomputed only once layer
``l + 1``'s backward pass has run, on every backend. The compiled temporary memory
(``memory_analysis().temp_size_in_bytes``) then falls as it should (tests/test_attention.py checks it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

REMAT_POLICIES = ("none", "full", "dots")
REMAT_SETTINGS = ("auto", *REMAT_POLICIES)  # what ``model.remat`` accepts
# ``auto`` recomputes layers (``full``) from this response budget on: the activations a layer keeps grow with the
# length (qwen3-1.7b, 512 + 16,384 tokens, one row per H100: 99 GiB of update temporaries kept against 38 GiB
# recomputed), while the recomputation costs about a third more forward arithmetic at every length
AUTO_FULL_RESPONSE_TOKENS = 8192

__all__ = ["AUTO_FULL_RESPONSE_TOKENS", "REMAT_POLICIES", "REMAT_SETTINGS", "rematerialised", "resolve_remat"]


def resolve_remat(setting: str, response_tokens: int) -> str:
    """The policy ``model.remat = setting`` stands for with responses of up to ``response_tokens``."""
    if setting != "auto":
        return setting
    return "full" if response_tokens >= AUTO_FULL_RESPONSE_TOKENS else "none"


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def _after(gradient, residuals, keep: list[bool]):
    """``residuals`` made to depend on ``gradient`` (the leaves flagged in ``keep`` are left alone)."""
    anchor = next((g.reshape(-1)[0] for g in jax.tree.leaves(gradient) if _is_float(g) and g.size), None)
    if anchor is None:
        return residuals
    zero = 0 * anchor
    leaves, treedef = jax.tree.flatten(residuals)
    leaves = [x if skip or not _is_float(x) else x + zero.astype(x.dtype) for x, skip in zip(leaves, keep)]
    return jax.tree.unflatten(treedef, leaves)


def _in_order(fn, policy):
    """``fn(params, args)`` with a backward pass that recomputes what ``policy`` does not save, after the output
    gradient arrives."""
    params_flags: list[bool] = []  # per residual leaf: is it a parameter (no need to delay reading those)

    @jax.custom_vjp
    def call(params, args):
        return fn(params, args)

    def fwd(params, args):
        out, vjp = jax.vjp(jax.checkpoint(fn, policy=policy), params, args)
        param_ids = {id(p) for p in jax.tree.leaves(params)}
        params_flags[:] = [id(r) in param_ids for r in jax.tree.leaves(vjp)]
        return out, vjp

    def bwd(vjp, g):
        return _after(g, vjp, params_flags)(g)

    call.defvjp(fwd, bwd)
    return call


def _plain(layer, *args):
    return layer(*args)


def rematerialised(policy: str):
    """``call(layer, *args) = layer(*args)`` under the rematerialisation ``policy`` (``REMAT_POLICIES``)."""
    if policy == "none":
        return _plain
    if policy not in REMAT_POLICIES:
        raise ValueError(f"model.remat must be one of {REMAT_POLICIES}, got {policy!r}")
    saveable = None if policy == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable

    def call(layer, *args):
        graphdef, params = nnx.split(layer)
        return _in_order(lambda p, a: nnx.merge(graphdef, p)(*a), saveable)(params, args)
    return call
