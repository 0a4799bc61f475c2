"""Device meshes and the logical-axis rules table that maps parameter axes to mesh axes.

Parameters carry logical axis names (``vocab``, ``embed``, ``heads``, ``kv_heads``, ``head_dim``, ``mlp``,
``experts``). One rules table maps each name to a mesh axis (or a tuple of them, or ``None`` for replicated);
changing the table re-shards the model without touching model code. A mesh axis is used at most once per array:
when two dimensions of one parameter map to the same mesh axis, the later one is replicated.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis -> mesh axis (or axes); the defaults give FSDP over `fsdp`, Megatron-style tensor parallelism
# over `tensor` and expert parallelism over `expert`
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "experts": "expert",
}

__all__ = ["MESH_AXES", "DEFAULT_RULES", "Layout", "make_mesh", "logical_to_pspec", "state_shardings",
           "model_shardings", "shard_model", "batch_sharding", "constrain_rows", "constrain_unembedding",
           "merge_rules"]

# the rules of the layout being traced (Layout.active), read by constrain_rows inside model code
_ACTIVE_RULES: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar("rules", default=DEFAULT_RULES)


def merge_rules(overrides: Mapping[str, object] | None) -> dict[str, object]:
    """:data:`DEFAULT_RULES` with ``overrides`` (``mesh.rules`` of a run config) on top; a list value becomes a
    tuple of mesh axes. Unknown logical names and mesh axes are errors naming them."""
    rules = dict(DEFAULT_RULES)
    for name, target in (overrides or {}).items():
        if name not in DEFAULT_RULES:
            raise ValueError(f"mesh.rules: unknown logical axis {name!r}; known: {sorted(DEFAULT_RULES)}")
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        bad = [t for t in targets if t not in MESH_AXES]
        if bad:
            raise ValueError(f"mesh.rules.{name}: unknown mesh axes {bad}; allowed: {MESH_AXES}")
        rules[name] = target if isinstance(target, str) or target is None else tuple(target)
    return rules


def make_mesh(axes: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all) with the named axis sizes; one size may be -1 (fill the rest).

    Axes not named get size 1, so every mesh has all of ``MESH_AXES`` and one rules table serves every layout.
    """
    devices = list(jax.devices() if devices is None else devices)
    axes = dict(axes or {"data": -1})
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; allowed: {MESH_AXES}")
    fill = [a for a, n in axes.items() if n == -1]
    if len(fill) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {fill}")
    known = math.prod(n for n in axes.values() if n != -1)
    if any(n == 0 or n < -1 for n in axes.values()):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {axes}")
    if fill:
        if len(devices) % known:
            raise ValueError(f"mesh {axes} cannot fill {len(devices)} devices: {len(devices)} is not divisible by "
                             f"{known}")
        axes[fill[0]] = len(devices) // known
    sizes = [axes.get(a, 1) for a in MESH_AXES]
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
                         f"{len(devices)} are available")
    return Mesh(np.array(devices).reshape(sizes), MESH_AXES)


def logical_to_pspec(names: Sequence[str | None], rules: Mapping[str, object] | None = None,
                     mesh: Mesh | None = None) -> P:
    """PartitionSpec for an array whose dimensions have the given logical names."""
    rules = DEFAULT_RULES if rules is None else rules
    unknown = [n for n in names if n is not None and n not in rules]
    if unknown:
        # a name missing from the table would silently replicate a (possibly huge) array
        raise ValueError(f"logical axes {unknown} are not in the rules table (known: {sorted(rules)}); map them "
                         "to a mesh axis or to None")
    used: set[str] = set()
    spec = []
    for name in names:
        target = rules.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t not in used and (mesh is None or mesh.shape.get(t, 1) > 1))
        used.update(targets)
        spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return P(*spec)


def _spec_fits(shape, spec: P, mesh: Mesh) -> P:
    """Drop mesh axes that do not divide the dimension they shard (replicate it instead)."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        size = math.prod(mesh.shape[a] for a in axes)
        out.append(entry if axes and dim % size == 0 else None)
    return P(*out)


def state_shardings(state, mesh: Mesh, rules: Mapping[str, object] | None = None):
    """NamedShardings for every variable of an nnx state (from its ``logical_axes`` metadata)."""

    def one(var):
        names = var.get_metadata().get("logical_axes") if isinstance(var, nnx.Variable) else None
        shape = var.get_value().shape if isinstance(var, nnx.Variable) else np.shape(var)
        if not names:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, _spec_fits(shape, logical_to_pspec(names, rules, mesh), mesh))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def model_shardings(model: nnx.Module, mesh: Mesh, rules: Mapping[str, object] | None = None):
    """NamedShardings for the model's whole state (same tree structure as ``nnx.state(model)``)."""
    return state_shardings(nnx.state(model), mesh, rules)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Mapping[str, object] | None = None) -> nnx.Module:
    """Place the model's parameters on ``mesh`` according to ``rules`` (in place; returns the model)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    values = jax.tree.map(lambda v: v.get_value() if isinstance(v, nnx.Variable) else v, state,
                          is_leaf=lambda x: isinstance(x, nnx.Variable))
    placed = jax.device_put(values, shardings)
    nnx.update(model, placed)
    return model


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Mapping[str, object] | None = None) -> NamedSharding:
    """Sharding of a ``[batch, ...]`` array: the batch axis over the data-parallel mesh axes."""
    return NamedSharding(mesh, logical_to_pspec(("batch",) + (None,) * (ndim - 1), rules, mesh))


def _row_axes(mesh, rules: Mapping[str, object]) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that split a row (``batch``) axis under ``rules``."""
    target = rules.get("batch")
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    return tuple(a for a in targets if a in mesh.axis_names and mesh.shape[a] > 1)


def constrain_rows(x: jax.Array, *, only_rows: bool = False) -> jax.Array:
    """Keep the leading (row) axis of an activation split over the mesh axes of the ``batch`` rule, on the mesh set
    with ``jax.set_mesh`` (:meth:`Layout.active`; a no-op without one, or when the rows do not divide).

    Without it XLA may resolve the clash between rows split over ``fsdp`` and weights split over ``fsdp`` (their
    ``embed`` dimension) by gathering the activations instead of the weights: every device then computes the whole
    batch, and the [rows, time, vocab] logits of the log-prob kernel are held unsplit. The other axes are
    replicated, or (``only_rows``) left to the partitioner (e.g. logits split over ``vocab``)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = _row_axes(mesh, _ACTIVE_RULES.get())
    if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    rest = (P.UNCONSTRAINED,) * (x.ndim - 1) if only_rows else ()
    return jax.lax.with_sharding_constraint(x, P(axes, *rest))


def constrain_unembedding(w: jax.Array) -> jax.Array:
    """The ``[embed, vocab]`` unembedding gathered over its ``embed`` axis (still split over ``vocab``) under the
    mesh set with ``jax.set_mesh`` (a no-op without one): the log-prob kernel multiplies each device's own rows
    by it, as FSDP gathers a layer's weights, instead of gathering the rows."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return w
    spec = _spec_fits(w.shape, logical_to_pspec((None, "vocab"), _ACTIVE_RULES.get(), mesh), mesh)
    return jax.lax.with_sharding_constraint(w, spec)


def constrain_state(state):
    """Every variable of an nnx ``state`` kept placed by its logical axes under the mesh set with ``jax.set_mesh``
    and the active rules (a no-op without a mesh): pins sharded weights where sharding propagation would move a
    gather (remat.py orders the layers' gathers with it)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return state
    rules = _ACTIVE_RULES.get()

    def one(var):
        names = var.get_metadata().get("logical_axes")
        value = var.get_value()
        spec = _spec_fits(value.shape, logical_to_pspec(names, rules, mesh), mesh) if names else P()
        return var.replace(jax.lax.with_sharding_constraint(value, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def active_row_ways() -> int:
    """Into how many blocks the mesh set with ``jax.set_mesh`` splits rows (the ``batch`` rule's axes; 1 without
    a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    return math.prod(mesh.shape[a] for a in _row_axes(mesh, _ACTIVE_RULES.get()))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a run's arrays live: a mesh and the logical-axis rules that place every array on it (parameters by
    their axis names, rows of batches by the ``batch`` rule)."""

    mesh: Mesh
    rules: Mapping[str, object] = dataclasses.field(default_factory=lambda: dict(DEFAULT_RULES))

    @property
    def row_axes(self) -> tuple[str, ...]:
        return _row_axes(self.mesh, self.rules)

    @property
    def row_ways(self) -> int:
        """Into how many blocks a row axis is split."""
        return math.prod(self.mesh.shape[a] for a in self.row_axes)

    def rows(self, rows: int | None = None, *, axis: int = 0) -> NamedSharding:
        """Sharding of an array whose axis ``axis`` holds rows: split over :attr:`row_axes`, or replicated when
        ``rows`` (if given) does not divide."""
        if not self.row_axes or (rows is not None and rows % self.row_ways):
            return NamedSharding(self.mesh, P())
        return NamedSharding(self.mesh, P(*([None] * axis), self.row_axes))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def place_rows(self, tree, row_axis=lambda x: 0):
        """Every leaf with its row axis (``row_axis(leaf)``) split over the row axes; leaves whose rows do not
        divide are left where they are."""

        def place(x):
            if getattr(x, "ndim", 0) == 0:
                return x
            axis = row_axis(x)
            if not self.row_axes or x.shape[axis] % self.row_ways:
                return x
            return jax.device_put(x, self.rows(axis=axis))

        return jax.tree.map(place, tree)

    def params(self, state):
        """The shardings of an nnx state's variables by their logical axis names."""
        return state_shardings(state, self.mesh, self.rules)

    @contextlib.contextmanager
    def active(self):
        """The mesh and rules as context while programs are traced: activations are then kept split by rows and
        each layer's weights gathered (:func:`constrain_rows`)."""
        token = _ACTIVE_RULES.set(self.rules)
        try:
            with jax.set_mesh(self.mesh):
                yield self
        finally:
            _ACTIVE_RULES.reset(token)
