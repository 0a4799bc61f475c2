"""Routed, dropless mixture of SwiGLU experts (Qwen3-MoE style): each token runs through its k experts only.

Routing, as in Qwen3-MoE: ``p = softmax(x W_r)`` in float32 over all ``E`` experts; the ``k`` largest are chosen,
or the given ``forced_experts`` (routing replay); the gate weights ``w`` are ``p`` at the chosen experts, divided
by their sum when ``norm_topk_prob``. The output is ``y(x) = sum_j w_j SwiGLU_{e_j}(x)`` with
``SwiGLU_e(x) = (silu(x G_e) * (x U_e)) D_e``.

Grouped products over tiles. The ``N k`` (token, expert) assignments are sorted by expert and each expert's run is
cut into tiles of ``T`` rows, its last tile padded; every tile then belongs to one expert and is multiplied by that
expert's weights only. With ``c_e`` assignments to expert ``e`` there are ``sum_e ceil(c_e / T) <=
(N k + E (T - 1)) / T`` tiles: the arrays are sized by that static bound, and a loop runs over the tiles in use.
No token is dropped whatever the routing. The work is at most ``N k + E (T - 1)`` rows of one expert's SwiGLU,
against ``N E`` rows when every expert is evaluated for every token.

Why not ``jax.lax.ragged_dot``: XLA:CPU lowers it to a masked product over every group (its compiled cost
analysis counts ``E`` times the useful FLOPs: ``benchmarks/moe.py`` prints it); a tile loop costs what it computes
on every backend. (GPU and TPU builds of XLA may lower ``ragged_dot`` to a grouped kernel; whether one beats the tile
loop there is not measured. :func:`_tile_map` is the one place such a kernel would go.) The loop is a ``while`` loop, whose body XLA's cost analysis counts once; under
:func:`static_tile_loops` the same tiles run in an unrolled loop over the static bound, so that the analysis
counts every tile (the FLOP benchmark uses it).

Each tile gathers its token rows and adds its weighted outputs back into the ``[N, D]`` output (a scatter-add of
``T`` distinct rows): no ``[N k, D]`` array of per-assignment rows is ever held. The backward pass is written by
hand (like ``layers.swiglu``): a second tile loop recomputes each tile's products instead of keeping ``[N k, F]``
activations, adds the input and gate-weight gradients back the same way, and accumulates the expert-weight
gradients per expert in float32. What is kept for it: the layer's input, gate weights and the tile plan (two
int32 per padded row).

Sharding: :func:`routed_experts` runs inside ``jax.shard_map`` over every mesh axis whenever the mesh has more
than one device. Rows are split over the batch axes (``data``, ``fsdp``) and replicated over ``expert`` and
``tensor`` (:mod:`jaxrl_llm.parallel`), so every device already holds all the tokens its expert shard may need:
it routes its own rows to its local experts only (``E / expert`` of them, the columns ``F / tensor`` of each),
and a ``psum`` over ``expert`` and ``tensor`` adds the partial outputs. No all-to-all is needed, and the routing
(a sort) stays per device: left to GSPMD, a sort along a split axis gathers the whole batch's routing onto every
device, which then computes every row. Weights enter with their ``embed`` dimension whole (the all-gather over
``fsdp`` that FSDP makes of any layer's weights; its transpose reduce-scatters their gradients). The mesh is the
one set by ``jax.set_mesh`` or else the one the weights live on, so callers that trace without a mesh context
(the sampler) shard the same way.
"""
from __future__ import annotations

import contextlib
import functools
import math

import flax
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxrl_llm.parallel import _spec_fits, logical_to_pspec

__all__ = ["moe_forward", "route", "routed_experts", "plan_tiles", "TilePlan", "tile_rows", "static_tile_loops"]

_MIN_TILE, _MAX_TILE = 8, 128
_STATIC_TILE_LOOPS = False


@contextlib.contextmanager
def static_tile_loops():
    """While tracing inside, tile loops run unrolled over their static bound (every tile, used or not) instead of
    a ``while`` loop over the tiles in use: the same arithmetic, fully visible to ``compiled.cost_analysis()``."""
    global _STATIC_TILE_LOOPS
    old, _STATIC_TILE_LOOPS = _STATIC_TILE_LOOPS, True
    try:
        yield
    finally:
        _STATIC_TILE_LOOPS = old


def route(x, router, k: int, norm_topk_prob: bool, forced_experts=None):
    """``(logits [..., E] float32, gate weights [..., k] float32, experts [..., k] int32)`` of ``x [..., D]``."""
    logits = jnp.einsum("...d,de->...e", x, router).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    if forced_experts is None:
        top_p, top_i = jax.lax.top_k(probs, k)
    else:
        top_i = forced_experts.astype(jnp.int32)
        top_p = jnp.take_along_axis(probs, top_i, axis=-1)
    if norm_topk_prob:
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    return logits, top_p, top_i


def tile_rows(assignments: int, experts: int) -> int:
    """Rows per tile: the power of two nearest below ``assignments / (4 experts)``, within [8, 128].

    Padding costs at most ``experts (T - 1)`` rows, so ``T <= assignments / (4 experts)`` bounds it by a quarter
    of the work (on average an expert's last tile is half full: an eighth); larger tiles make larger products."""
    target = max(assignments // (4 * experts), 1)
    return int(min(max(1 << (target.bit_length() - 1), _MIN_TILE), _MAX_TILE))


@flax.struct.dataclass
class TilePlan:
    """Where every assignment goes: padded row ``p < tiles T`` lies in tile ``p // T``, of expert
    ``tile_expert[p // T]``, and holds assignment ``row_assign[p]`` (of token ``row_token[p]``) or is padding."""

    row_token: jax.Array  # int32 [tiles * T]: the token of each row; N (out of range) for padding
    row_assign: jax.Array  # int32 [tiles * T]: the assignment (token * k + j) of each row; N k for padding
    tile_expert: jax.Array  # int32 [tiles]: local expert of each tile
    tiles_used: jax.Array  # int32 scalar
    tile: int = flax.struct.field(pytree_node=False, default=_MIN_TILE)


def plan_tiles(experts: jax.Array, num_local: int, first: jax.Array | int = 0, num_total: int | None = None
               ) -> TilePlan:
    """Group the assignments ``experts [N, k]`` to the local experts ``first .. first + num_local - 1`` (of
    ``num_total``) into tiles (a stable sort by expert: within an expert, assignments keep token order)."""
    n, k = experts.shape
    a = n * k
    # at most a assignments are local (min(k, E_local) per token when a token's experts are distinct, as top-k
    # makes them; the bound also holds for a forced routing that repeats an expert)
    tile = tile_rows(a, num_total or num_local)  # the tile size of an even load: a / num_total per expert
    tiles = (a + num_local * (tile - 1)) // tile
    flat = experts.reshape(-1) - first
    key = jnp.where((flat >= 0) & (flat < num_local), flat, num_local)  # other devices' experts sort last
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    counts = jnp.zeros(num_local + 1, jnp.int32).at[key].add(1)[:num_local]
    expert_tiles = (counts + tile - 1) // tile
    tile_end = jnp.cumsum(expert_tiles)
    pad_start = (tile_end - expert_tiles) * tile  # first padded row of each expert
    group_start = jnp.cumsum(counts) - counts  # first sorted assignment of each expert
    tile_expert = jnp.minimum(jnp.searchsorted(tile_end, jnp.arange(tiles), side="right"), num_local - 1)
    row_expert = jnp.repeat(tile_expert, tile)
    rank = jnp.arange(tiles * tile) - pad_start[row_expert]
    valid = rank < counts[row_expert]  # rows of unused tiles are past their expert's assignments too
    row_assign = jnp.where(valid, order[jnp.clip(group_start[row_expert] + rank, 0, a - 1)], a).astype(jnp.int32)
    return TilePlan(row_token=jnp.where(valid, row_assign // k, n).astype(jnp.int32), row_assign=row_assign,
                    tile_expert=tile_expert.astype(jnp.int32), tiles_used=tile_end[-1].astype(jnp.int32), tile=tile)


def _varying_like(tree, operands):
    """``tree`` marked as varying over every manual mesh axis (inside ``shard_map``) that any of ``operands`` varies
    over. The transpose of that cast is a ``psum``: it sums the gradients of replicated inputs."""
    axes = frozenset().union(*(jax.typeof(a).mat.varying for a in jax.tree.leaves(operands)))

    def cast(a):
        missing = tuple(sorted(axes - jax.typeof(a).mat.varying))
        return jax.lax.pcast(a, missing, to="varying") if missing else a

    return jax.tree.map(cast, tree)


def _tile_map(plan: TilePlan, tile_fn, sums, expert_sums, operands):
    """Run ``tile_fn(i, e) -> (row_terms, expert_terms)`` over the tiles ``i`` (of expert ``e``), adding
    ``row_terms[j] [T, ...]`` at the rows ``plan.row_token`` (``j = 0``) or ``plan.row_assign`` (``j = 1``) of
    ``sums[j]`` (padding rows point past the end and are dropped), and ``expert_terms[j]`` to ``expert_sums[j][e]``.

    A ``while`` loop over the tiles in use; under :func:`static_tile_loops` a traced sequence of every tile of the
    bound, the terms added at the end. Within a tile the rows are distinct tokens (a token's experts are), so the
    sums are deterministic: each token receives its experts' terms in the order of the tiles. Inside
    ``shard_map`` the sums vary over the mesh axes any of ``operands`` (what ``tile_fn`` reads) varies over."""
    sums, expert_sums = _varying_like((sums, expert_sums), operands)
    targets = (plan.row_token, plan.row_assign)
    if _STATIC_TILE_LOOPS:
        outs = [tile_fn(i, plan.tile_expert[i]) for i in range(plan.tile_expert.shape[0])]
        sums = tuple(acc.at[targets[j]].add(jnp.concatenate([o[0][j] for o in outs]), mode="drop")
                     for j, acc in enumerate(sums))
        expert_sums = tuple(
            acc + jax.ops.segment_sum(jnp.stack([o[1][j] for o in outs]), plan.tile_expert, acc.shape[0],
                                      indices_are_sorted=True)
            for j, acc in enumerate(expert_sums))
        return sums, expert_sums

    def body(i, carry):
        accs, expert_accs = carry
        e = plan.tile_expert[i]
        terms, expert_terms = tile_fn(i, e)
        return (tuple(acc.at[_tile_rows(targets[j], i, plan.tile)].add(t, mode="drop")
                      for j, (acc, t) in enumerate(zip(accs, terms))),
                tuple(acc.at[e].add(t) for acc, t in zip(expert_accs, expert_terms)))

    return jax.lax.fori_loop(0, plan.tiles_used, body, (sums, expert_sums))


def _tile_rows(a, i, tile):
    """Rows ``i T .. (i + 1) T`` of ``a`` (``i`` a Python int under :func:`static_tile_loops`)."""
    if isinstance(i, int):
        return jax.lax.slice_in_dim(a, i * tile, (i + 1) * tile)
    return jax.lax.dynamic_slice_in_dim(a, i * tile, tile)


def _gather(a, index):
    """``a[index]`` with zeros where ``index`` is past the end (padding rows)."""
    return jnp.take(a, index, axis=0, mode="fill", fill_value=0)


@jax.custom_vjp
def _routed_swiglu(x, weights, gate, up, down, plan: TilePlan):
    """``out[n] = sum_j weights[n, j] SwiGLU_{e_nj}(x[n])`` over the local assignments of ``plan``; ``x [N, D]``,
    ``weights [N, k]`` float32, expert weights ``[E_local, D, F]`` / ``[E_local, F, D]``."""
    w = weights.reshape(-1).astype(x.dtype)

    def tile_fn(i, e):
        rows = _gather(x, _tile_rows(plan.row_token, i, plan.tile))
        h = jax.nn.silu(rows @ gate[e]) * (rows @ up[e])
        return ((h @ down[e]) * _gather(w, _tile_rows(plan.row_assign, i, plan.tile))[:, None],), ()

    (out,), _ = _tile_map(plan, tile_fn, (jnp.zeros_like(x),), (), (x, w, gate, up, down, plan.tile_expert))
    return out


def _routed_swiglu_fwd(x, weights, gate, up, down, plan):
    return _routed_swiglu(x, weights, gate, up, down, plan), (x, weights, gate, up, down, plan)


def _routed_swiglu_bwd(res, dout):
    """Per tile of expert e with rows x, gate weights w and output gradients o (rows of ``dout``):
    ``g = x G_e, u = x U_e, h = silu(g) u, y = h D_e``; ``dw = <o, y>``, ``dy = w o``, ``dh = dy D_e^T``,
    ``dg = dh u silu'(g)``, ``du = dh silu(g)``, ``dx = dg G_e^T + du U_e^T``, ``dG_e += x^T dg``,
    ``dU_e += x^T du``, ``dD_e += h^T dy``."""
    x, weights, gate, up, down, plan = res
    tile = plan.tile
    w = weights.reshape(-1).astype(x.dtype)
    f32 = functools.partial(jnp.matmul, preferred_element_type=jnp.float32)

    def tile_fn(i, e):
        tokens = _tile_rows(plan.row_token, i, tile)
        xt, ot = _gather(x, tokens), _gather(dout, tokens)
        wt = _gather(w, _tile_rows(plan.row_assign, i, tile))
        g, u = xt @ gate[e], xt @ up[e]
        sig = jax.nn.sigmoid(g)
        silu = g * sig
        h = silu * u
        dw = jnp.sum((ot * (h @ down[e])).astype(jnp.float32), axis=-1)
        dy = ot * wt[:, None]
        dh = dy @ down[e].T
        dg = dh * u * sig * (1 + g * (1 - sig))
        du = dh * silu
        dx = dg @ gate[e].T + du @ up[e].T
        xt_t = xt.T
        return (dx, dw), (f32(xt_t, dg), f32(xt_t, du), f32(h.T, dy))

    sums = (jnp.zeros_like(x), jnp.zeros(w.shape, jnp.float32))
    expert_sums = tuple(jnp.zeros(a.shape, jnp.float32) for a in (gate, up, down))
    (dx, dw), (dgate, dup, ddown) = _tile_map(plan, tile_fn, sums, expert_sums,
                                              (x, dout, w, gate, up, down, plan.tile_expert))
    return (dx, dw.reshape(weights.shape).astype(weights.dtype), dgate.astype(gate.dtype), dup.astype(up.dtype),
            ddown.astype(down.dtype), None)


_routed_swiglu.defvjp(_routed_swiglu_fwd, _routed_swiglu_bwd)


def _local_experts(x, weights, experts, gate, up, down, *, first=0, num_total=None):
    """The routed experts on one device: ``x [..., D]`` through its local experts ``first ..`` (of ``num_total``)."""
    shape = x.shape
    k = experts.shape[-1]
    plan = plan_tiles(experts.reshape(-1, k), gate.shape[0], first, num_total)
    # inside shard_map: rows vary over the batch axes, weights over `expert`/`tensor`; the custom VJP returns
    # gradients varying over all of them, so every input is cast to that first (summing its gradient)
    x, weights, gate, up, down = _varying_like((x, weights, gate, up, down), (x, weights, gate, up, down, plan))
    out = _routed_swiglu(x.reshape(-1, shape[-1]), weights.reshape(-1, k), gate, up, down, plan)
    return out.reshape(shape)


def _mesh_of(weight):
    """The mesh the expert weights live on: the one set by ``jax.set_mesh``, else the one of the weights' own
    sharding (inside ``jit`` their abstract mesh); ``None`` for a single device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        mesh = getattr(jax.typeof(weight).sharding, "mesh", None)
    if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
        return None
    return mesh


def _axes(entry) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def routed_experts(x, weights, experts, gate, up, down):
    """``sum_j weights[..., j] SwiGLU_{experts[..., j]}(x)`` for ``x [B, T, D]``, grouped by expert; sharded over the
    weights' mesh when there is one (see the module docstring)."""
    mesh = _mesh_of(gate)
    if mesh is None:
        return _local_experts(x, weights, experts, gate, up, down)
    # a mesh axis that does not divide its dimension replicates it (as parallel.state_shardings does)
    rows = _spec_fits(x.shape, logical_to_pspec(("batch",), mesh=mesh), mesh)
    # experts split over `expert`, their F columns over `tensor`; D whole (gathered over `fsdp` on entry)
    w_in = _spec_fits(gate.shape, logical_to_pspec(("experts", None, "mlp"), mesh=mesh), mesh)
    w_out = P(w_in[0], w_in[2], None)
    expert_axes, column_axes = _axes(w_in[0]), _axes(w_in[2])
    partial_axes = expert_axes + column_axes
    num_experts = gate.shape[0]

    def shard(x, weights, experts, gate, up, down):
        first = 0
        if expert_axes:
            first = jax.lax.axis_index(expert_axes) * gate.shape[0]
        out = _local_experts(x, weights, experts, gate, up, down, first=first, num_total=num_experts)
        return jax.lax.psum(out, partial_axes) if partial_axes else out

    return jax.shard_map(shard, mesh=mesh, in_specs=(rows, rows, rows, w_in, w_in, w_out), out_specs=rows)(
        x, weights, experts, gate, up, down)


def moe_forward(x, router, gate, up, down, *, k: int, norm_topk_prob: bool, forced_experts=None):
    """A Qwen3-MoE block on ``x [B, T, D]`` (weights already in the compute dtype): ``(out [B, T, D], router logits
    [B, T, E] float32, experts [B, T, k] int32)``."""
    logits, top_p, top_i = route(x, router, k, norm_topk_prob, forced_experts)
    return routed_experts(x, top_p, top_i, gate, up, down), logits, top_i


def _dense_experts(x, weights, experts, gate, up, down):
    """Reference: every expert evaluated for every token, combined with the gate weights (zero for the experts not
    chosen); ``E / k`` times the work of :func:`routed_experts`."""
    num = gate.shape[0]
    w = jnp.sum(jax.nn.one_hot(experts, num, dtype=jnp.float32) * weights[..., None], axis=-2)
    g = jnp.einsum("btd,edf->btef", x, gate)
    u = jnp.einsum("btd,edf->btef", x, up)
    y = jnp.einsum("btef,efd->bted", jax.nn.silu(g) * u, down)
    return jnp.einsum("bted,bte->btd", y, w.astype(x.dtype))
