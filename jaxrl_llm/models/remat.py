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

The same dependence orders the gathers of weights sharded over ``fsdp``. XLA gathers a sharded weight where it is
used; a plain loop of layers lets it gather every layer's weights once, hoisted out of the micro-batch loop, and
keep them gathered for the backward pass: a whole model's worth of memory per device. On a mesh every layer's
weights are therefore made to depend on the previous layer's input (forward) and on the layer's output gradient
(backward), so at most about two layers' weights are gathered at a time (``tests/test_plan.py`` checks that the
compiled temporaries do not grow with the layer count). ``optimization_barrier`` would say the same but does not
hold: XLA:CPU removes it before scheduling.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_llm.parallel import constrain_state

REMAT_POLICIES = ("none", "full", "dots")
REMAT_SETTINGS = ("auto", *REMAT_POLICIES)  # what ``model.remat`` accepts
# ``auto`` recomputes layers (``full``) from this response budget on: the activations a layer keeps grow with the
# length (qwen3-1.7b, 512 + 16,384 tokens, one row per H100: 99 GiB of update temporaries kept against 38 GiB
# recomputed), while the recomputation costs about a third more forward arithmetic at every length
AUTO_FULL_RESPONSE_TOKENS = 8192

__all__ = ["AUTO_FULL_RESPONSE_TOKENS", "REMAT_POLICIES", "REMAT_SETTINGS", "after", "rematerialised",
           "resolve_remat"]


def resolve_remat(setting: str, response_tokens: int) -> str:
    """The policy ``model.remat = setting`` stands for with responses of up to ``response_tokens``."""
    if setting != "auto":
        return setting
    return "full" if response_tokens >= AUTO_FULL_RESPONSE_TOKENS else "none"


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def after(gradient, residuals, keep: list[bool] | None = None):
    """``residuals`` made to depend on ``gradient`` (``x + 0 * g[0]``, exact for finite values), so that XLA
    computes or allocates them only once ``gradient`` exists; the leaves flagged in ``keep`` are left alone."""
    keep = [False] * len(jax.tree.leaves(residuals)) if keep is None else keep
    # one element, indexed rather than flattened: the transpose of taking an element is that element padded to
    # the whole array, which stays sharded like it; flattening a row-sharded array first would pad the whole
    # batch's values on every device
    anchor = next((g[(0,) * g.ndim] for g in jax.tree.leaves(gradient) if _is_float(g) and g.size), None)
    if anchor is None:
        return residuals
    zero = 0 * anchor
    leaves, treedef = jax.tree.flatten(residuals)
    leaves = [x if skip or not _is_float(x) else x + zero.astype(x.dtype) for x, skip in zip(leaves, keep)]
    return jax.tree.unflatten(treedef, leaves)


def _in_order(fn, policy, *, delay_params: bool = False):
    """``fn(params, args)`` with a backward pass that recomputes what ``policy`` does not save, after the output
    gradient arrives; ``delay_params`` also makes the backward pass read the parameters only then (so sharded
    weights are gathered again there rather than kept gathered from the forward pass)."""
    params_flags: list[bool] = []  # per residual leaf: is it a parameter (not delayed unless delay_params)

    @jax.custom_vjp
    def call(params, args):
        return fn(params, args)

    def fwd(params, args):
        out, vjp = jax.vjp(jax.checkpoint(fn, policy=policy), params, args)
        param_ids = {id(p) for p in jax.tree.leaves(params)}
        params_flags[:] = [id(r) in param_ids and not delay_params for r in jax.tree.leaves(vjp)]
        return out, vjp

    def bwd(vjp, g):
        return after(g, vjp, params_flags)(g)

    call.defvjp(fwd, bwd)
    return call


def _on_a_mesh() -> bool:
    """Whether the program is traced under a mesh of more than one device (``jax.set_mesh``), whose sharded
    weights each layer gathers."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and mesh.size > 1


_SAVEABLE = {"none": jax.checkpoint_policies.everything_saveable, "full": None,
             "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def rematerialised(policy: str):
    """``call(layer, anchor, *args) = layer(*args)`` under the rematerialisation ``policy`` (``REMAT_POLICIES``).

    On a mesh, the layer's weights are read only once ``anchor`` exists (the decoder passes the previous layer's
    input), and its backward pass reads them again once its output gradient exists: weights sharded over
    ``fsdp`` are then gathered about one layer at a time, forward and backward, instead of all at the start and
    kept gathered until the backward pass (which XLA's schedulers do with a plain loop of layers)."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"model.remat must be one of {REMAT_POLICIES}, got {policy!r}")

    def call(layer, anchor, *args):
        ordered = _on_a_mesh()
        if policy == "none" and not ordered:
            return layer(*args)
        graphdef, params = nnx.split(layer)
        if ordered:  # kept sharded on both sides of the dependence, so that the gather comes after it
            params = constrain_state(after(anchor, constrain_state(params)))
        fn = _in_order(lambda p, a: nnx.merge(graphdef, p)(*a), _SAVEABLE[policy], delay_params=ordered)
        return fn(params, args)
    return call
