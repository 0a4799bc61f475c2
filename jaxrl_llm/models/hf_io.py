"""Hugging Face checkpoints in and out: config.json + safetensors (single file or sharded with an index).

Loading builds the model abstractly (``nnx.eval_shape``: no random init), computes every parameter's final
``NamedSharding`` and creates it with ``jax.make_array_from_callback``. The callback reads, through
``safe_open(...).get_slice``, only the block of the stored tensor that the requesting device holds, so no host
or device ever materialises a full unsharded copy of a sharded parameter.

Before anything is read, every expected tensor must be present with the shape the config implies and a floating
dtype, and every stored tensor must be used; otherwise the error names the tensor (and its file). Nothing is
ever silently left randomly initialised.

Layouts. Hugging Face stores a linear layer as ``[out, in]``; ours are ``[in, ...out]`` with the head axes split
out (``q: [embed, heads, head_dim]``, ``o: [heads, head_dim, embed]``). A :class:`HFTensor` describes the
correspondence as "stored dimension j is the flattening of our dimensions ``dims[j]``", which is enough to turn
a device's block of our array into a block of the stored tensor. Qwen3-MoE experts are read either from the
per-expert layout (``mlp.experts.{e}.{gate,up,down}_proj.weight``, what ``save_pretrained`` writes) or from the
fused layout (``mlp.experts.gate_up_proj [E, 2F, D]``, ``mlp.experts.down_proj [E, D, F]``); they are saved in
the per-expert layout, which ``transformers.AutoModelForCausalLM.from_pretrained`` converts on load.

Paths may be URIs (:mod:`jaxrl_llm.paths`). ``safe_open`` needs a local file to memory-map, so a URI checkpoint
is first mirrored into the local model cache (``cache_dir``, else ``$JAXRL_CACHE_DIR/models``) by
:func:`jaxrl_llm.paths.local_copy`; every host of a multi-host run makes its own copy. Saving to a URI writes the
files into a local temporary directory and uploads them (:func:`jaxrl_llm.paths.staged_output`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np
from flax import nnx

from jaxrl_llm import paths
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.decoder import Decoder

__all__ = ["HFTensor", "ParamSource", "load_hf", "save_hf", "load_config", "read_safetensors_index",
           "weight_map", "parse_size"]

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# tensors some exporters write that carry no parameters
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

Path = tuple  # an nnx state path, e.g. ("layers", 0, "attn", "q")
Range = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One stored tensor (or a sub-block of one) as seen from one of our arrays.

    ``dims[j]`` lists our axes whose row-major flattening is stored dimension ``j``; ``offsets[j]`` is where our
    block starts along stored dimension ``j`` (non-zero only for the up half of a fused ``gate_up_proj``).
    ``shape`` is the full stored shape the config implies.
    """

    key: str
    shape: tuple[int, ...]
    dims: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...] = ()

    def read(self, tensor_slice, ranges: list[Range], our_shape: tuple[int, ...]) -> np.ndarray:
        """Our block ``[ranges]`` (our layout) read from a safetensors slice of this tensor.

        The first of each group of our axes selects a contiguous run of stored rows; the remaining axes of the
        group are read whole and cut afterwards (they are small: head_dim, or unsharded in practice).
        """
        offsets = self.offsets or (0,) * len(self.dims)
        index, block_shape = [], []
        for group, off in zip(self.dims, offsets):
            inner = math.prod(our_shape[d] for d in group[1:])
            lo, hi = ranges[group[0]]
            index.append(slice(off + lo * inner, off + hi * inner))
            block_shape += [hi - lo] + [our_shape[d] for d in group[1:]]
        block = np.asarray(tensor_slice[tuple(index)]).reshape(block_shape)
        order = [d for group in self.dims for d in group]
        block = block.transpose(np.argsort(order))
        cut = [slice(None)] * len(our_shape)
        for group in self.dims:
            for d in group[1:]:
                cut[d] = slice(*ranges[d])
        return block[tuple(cut)]

    def write(self, x: np.ndarray) -> np.ndarray:
        """The stored tensor from our full array (only for tensors without offsets)."""
        order = [d for group in self.dims for d in group]
        return np.ascontiguousarray(x.transpose(order).reshape(self.shape))


@dataclasses.dataclass(frozen=True)
class ParamSource:
    """Where one of our parameters lives in a checkpoint.

    ``tensors`` is one tensor, or with ``stacked`` one tensor per index of our axis 0 (per-expert weights; their
    ``dims`` then refer to our axes after dropping axis 0). ``fused`` is an alternative single-tensor layout.
    """

    tensors: tuple[HFTensor, ...]
    stacked: bool = False
    fused: HFTensor | None = None

    @property
    def keys(self) -> list[str]:
        return [t.key for t in self.tensors]


def _copy(key, shape) -> ParamSource:
    return ParamSource((HFTensor(key, tuple(shape), tuple((i,) for i in range(len(shape)))),))


def _linear_in_first(key, in_dim, out_shape) -> ParamSource:
    """Ours ``[in, *out]`` from a PyTorch ``[prod(out), in]`` weight."""
    outs = tuple(range(1, 1 + len(out_shape)))
    return ParamSource((HFTensor(key, (math.prod(out_shape), in_dim), (outs, (0,))),))


def weight_map(cfg: ModelConfig) -> dict[Path, ParamSource]:
    """Our parameter path -> its :class:`ParamSource` in a Hugging Face checkpoint."""
    d, h, kv, hd, v = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    m: dict[Path, ParamSource] = {("embed",): _copy("model.embed_tokens.weight", (v, d)),
                                  ("norm", "weight"): _copy("model.norm.weight", (d,))}
    if not cfg.tie_word_embeddings:
        m[("lm_head",)] = _linear_in_first("lm_head.weight", d, (v,))
    for i in range(cfg.num_layers):
        p, L = f"model.layers.{i}.", ("layers", i)
        m[L + ("attn_norm", "weight")] = _copy(p + "input_layernorm.weight", (d,))
        m[L + ("mlp_norm", "weight")] = _copy(p + "post_attention_layernorm.weight", (d,))
        for name, heads in (("q", h), ("k", kv), ("v", kv)):
            m[L + ("attn", name)] = _linear_in_first(p + f"self_attn.{name}_proj.weight", d, (heads, hd))
            if cfg.qkv_bias:
                m[L + ("attn", f"{name}_bias")] = ParamSource(
                    (HFTensor(p + f"self_attn.{name}_proj.bias", (heads * hd,), ((0, 1),)),))
        # o: ours [heads, head_dim, embed] from PyTorch [embed, heads * head_dim]
        m[L + ("attn", "o")] = ParamSource((HFTensor(p + "self_attn.o_proj.weight", (d, h * hd), ((2,), (0, 1))),))
        if cfg.o_bias:
            m[L + ("attn", "o_bias")] = _copy(p + "self_attn.o_proj.bias", (d,))
        if cfg.qk_norm:
            m[L + ("attn", "q_norm", "weight")] = _copy(p + "self_attn.q_norm.weight", (hd,))
            m[L + ("attn", "k_norm", "weight")] = _copy(p + "self_attn.k_norm.weight", (hd,))
        if cfg.layer_is_moe(i):
            e, f = cfg.num_experts, cfg.moe_intermediate_size
            m[L + ("mlp", "router")] = _linear_in_first(p + "mlp.gate.weight", d, (e,))
            x = p + "mlp.experts."
            # per expert: gate/up ours [d, f] from [f, d]; down ours [f, d] from [d, f]
            for name, fused in (("gate", HFTensor(x + "gate_up_proj", (e, 2 * f, d), ((0,), (2,), (1,)), (0, 0, 0))),
                                ("up", HFTensor(x + "gate_up_proj", (e, 2 * f, d), ((0,), (2,), (1,)), (0, f, 0))),
                                ("down", HFTensor(x + "down_proj", (e, d, f), ((0,), (2,), (1,))))):
                shape = (d, f) if name != "down" else (f, d)
                per = tuple(HFTensor(x + f"{j}.{name}_proj.weight", shape[::-1], ((1,), (0,))) for j in range(e))
                m[L + ("mlp", name)] = ParamSource(per, stacked=True, fused=fused)
        else:
            f = cfg.intermediate_size
            m[L + ("mlp", "gate")] = _linear_in_first(p + "mlp.gate_proj.weight", d, (f,))
            m[L + ("mlp", "up")] = _linear_in_first(p + "mlp.up_proj.weight", d, (f,))
            m[L + ("mlp", "down")] = _linear_in_first(p + "mlp.down_proj.weight", f, (d,))
    return m


# ---- reading --------------------------------------------------------------------------------------------------

def read_safetensors_index(path: str) -> dict[str, str]:
    """``tensor name -> file`` for a checkpoint directory (single file or sharded index)."""
    index = os.path.join(path, SAFE_INDEX)
    single = os.path.join(path, SAFE_SINGLE)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            try:
                mapping = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"corrupt safetensors index {index}: {err!r}") from err
        return {k: os.path.join(path, v) for k, v in mapping.items()}
    if os.path.exists(single):
        from safetensors import safe_open

        try:
            with safe_open(single, "np") as f:
                return {k: single for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"cannot read safetensors file {single}: {err}") from err
    raise FileNotFoundError(f"no {SAFE_SINGLE} or {SAFE_INDEX} in {path}")


class _Checkpoint:
    """The tensors of a checkpoint directory, each file opened once, read lazily by slices."""

    def __init__(self, path: str):
        self.path = path
        self.files = read_safetensors_index(path)
        self._open = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def slice(self, name: str):
        from safetensors import safe_open

        if name not in self.files:
            raise ValueError(f"checkpoint {self.path} is missing tensor {name!r}")
        file = self.files[name]
        if file not in self._open:
            if not os.path.exists(file):
                raise FileNotFoundError(f"tensor {name!r} is mapped to {file}, which does not exist")
            try:
                self._open[file] = safe_open(file, "np")
            except Exception as err:
                raise ValueError(f"cannot read safetensors file {file} (needed for {name!r}): {err}") from err
        try:
            return self._open[file].get_slice(name)
        except Exception as err:
            raise ValueError(f"cannot read tensor {name!r} from {file}: {err}") from err

    def check(self, t: HFTensor) -> None:
        """Shape and dtype of a stored tensor against what the config implies."""
        s = self.slice(t.key)
        shape, dtype = tuple(s.get_shape()), s.get_dtype()
        if shape != t.shape:
            raise ValueError(f"tensor {t.key!r} in {self.files[t.key]} has shape {shape}, but the config implies "
                             f"{t.shape}")
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"tensor {t.key!r} in {self.files[t.key]} has dtype {dtype}; expected one of "
                             f"{_FLOAT_DTYPES}")


def _ranges(index, shape) -> list[Range]:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {s} is not supported")
        out.append((start, stop))
    return out


def _resolve(ckpt: _Checkpoint, key: Path, src: ParamSource) -> tuple[HFTensor, ...] | HFTensor:
    """The tensors a parameter is read from: its primary layout, else the fused one; errors name the tensor."""
    missing = [t.key for t in src.tensors if t.key not in ckpt]
    if not missing:
        for t in src.tensors:
            ckpt.check(t)
        return src.tensors
    if src.fused is not None and src.fused.key in ckpt:
        ckpt.check(src.fused)
        return src.fused
    alt = f" (nor its fused form {src.fused.key!r})" if src.fused is not None else ""
    raise ValueError(f"checkpoint {ckpt.path} is missing tensor {missing[0]!r}{alt}, needed for parameter "
                     f"{'/'.join(map(str, key))}")


def _block_reader(ckpt: _Checkpoint, src: ParamSource, chosen, shape, dtype):
    """``index -> our block`` for ``jax.make_array_from_callback``; identical blocks are read once."""
    cache: dict[tuple, np.ndarray] = {}

    def read(index):
        ranges = _ranges(index, shape)
        key = tuple(ranges)
        if key not in cache:
            if isinstance(chosen, HFTensor):
                block = chosen.read(ckpt.slice(chosen.key), ranges, shape)
            elif src.stacked:
                lo, hi = ranges[0]
                block = np.stack([t.read(ckpt.slice(t.key), ranges[1:], shape[1:]) for t in chosen[lo:hi]])
            else:
                block = chosen[0].read(ckpt.slice(chosen[0].key), ranges, shape)
            cache[key] = np.ascontiguousarray(block.astype(dtype))
        return cache[key]

    return read


def load_config(path: str, *, cache_dir: str | None = None) -> ModelConfig:
    """The :class:`ModelConfig` of a checkpoint directory, local or a URI (via ``transformers.AutoConfig``)."""
    import transformers

    if not paths.exists(paths.join(path, "config.json")):
        raise FileNotFoundError(f"no config.json in {path}")
    local = paths.local_path(path)
    if local is None:  # config.json alone; the weights are copied by load_hf
        with tempfile_dir() as tmp:
            with open(os.path.join(tmp, "config.json"), "wb") as f:
                f.write(paths.read_bytes(paths.join(path, "config.json")))
            return ModelConfig.from_hf(transformers.AutoConfig.from_pretrained(tmp))
    return ModelConfig.from_hf(transformers.AutoConfig.from_pretrained(local))


def tempfile_dir():
    import tempfile

    return tempfile.TemporaryDirectory(prefix="jaxrl_cfg_")


def _path_key(path) -> Path:
    return tuple(p.key if hasattr(p, "key") else p.idx if hasattr(p, "idx") else p for p in path)


def load_hf(path: str, *, mesh=None, rules=None, dtype=jnp.float32, param_dtype=jnp.float32,
            remat: str = "none", attention: str = "auto", cache_dir: str | None = None
            ) -> tuple[Decoder, ModelConfig]:
    """Load a Hugging Face checkpoint directory into a :class:`Decoder`.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` or ``model.safetensors.index.json``
        (tokenizer and generation files may be present and are left alone); a local path or a URI, which is
        mirrored into ``cache_dir`` first (see the module docstring).
      mesh, rules: place each parameter on ``mesh`` by the logical-axis ``rules``
        (:data:`jaxrl_llm.parallel.DEFAULT_RULES` when None); without a mesh, on the first device.
      dtype, param_dtype: compute and parameter dtypes; stored tensors are cast to ``param_dtype``.
      remat: activation rematerialisation policy (see :class:`Decoder`).
      attention: the attention kernel (see :mod:`jaxrl_llm.models.attention`).
    Returns:
      ``(model, cfg)``.
    """
    from jaxrl_llm.parallel import state_shardings

    if not paths.isdir(path):
        raise FileNotFoundError(f"model checkpoint directory not found: {path}")
    path = paths.local_copy(path, cache=cache_dir)
    cfg = load_config(path)
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                              remat=remat, attention=attention))
    graphdef, state = nnx.split(abstract)
    if mesh is not None:
        shardings = state_shardings(state, mesh, rules)
    else:
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: single, state, is_leaf=lambda x: isinstance(x, nnx.Variable))

    ckpt = _Checkpoint(path)
    wmap = weight_map(cfg)
    flat_state = dict(nnx.to_flat_state(state))
    flat_shard = dict(nnx.to_flat_state(shardings))
    # validate everything before reading any data
    plan, used = {}, set()
    for raw_path in flat_state:
        key = _path_key(raw_path)
        if key not in wmap:
            raise ValueError(f"no checkpoint mapping for parameter {'/'.join(map(str, key))}")
        chosen = _resolve(ckpt, key, wmap[key])
        used.update([chosen.key] if isinstance(chosen, HFTensor) else [t.key for t in chosen])
        plan[raw_path] = chosen
    ignorable = lambda n: n.endswith(_IGNORED_SUFFIXES) or (cfg.tie_word_embeddings and n == "lm_head.weight")
    unexpected = sorted(n for n in ckpt.files if n not in used and not ignorable(n))
    if unexpected:
        raise ValueError(f"checkpoint {path} has tensors the config does not use: {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")

    for raw_path, var in flat_state.items():
        shape, pdtype = tuple(var.get_value().shape), var.get_value().dtype
        sharding = flat_shard[raw_path]
        sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
        reader = _block_reader(ckpt, wmap[_path_key(raw_path)], plan[raw_path], shape, np.dtype(pdtype))
        var.set_value(jax.make_array_from_callback(shape, sharding, reader))
    return nnx.merge(graphdef, state), cfg


# ---- writing --------------------------------------------------------------------------------------------------

def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"500MB"``, ``"5GB"``, ``"2GiB"``."""
    if isinstance(size, (int, np.integer)):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return int(size)
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in units:
        raise ValueError(f"max_shard_size must be bytes or a string like '5GB', got {size!r}")
    return int(float(m.group(1)) * units[m.group(2).upper()])


def _host_value(x) -> np.ndarray:
    """A full host copy of a (possibly multi-host sharded) array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def save_hf(model: Decoder, path, out_path: str | None = None, *, max_shard_size: int | str = "2GB",
            dtype=None, tokenizer=None) -> None:
    """Write a Hugging Face checkpoint: ``config.json`` and safetensors, sharded with an index above a size.

    Call as ``save_hf(model, path)`` or ``save_hf(model, cfg, path)`` (the config must be ``model.cfg``).
    Tensors are gathered and written one shard at a time, so the host holds at most one shard. With several
    processes every process takes part in the gathers and process 0 writes.

    Args:
      max_shard_size: bytes per safetensors file (int or e.g. ``"5GB"``); one ``model.safetensors`` when all
        tensors fit, else ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``.
      dtype: cast tensors to this dtype (e.g. ``jnp.bfloat16``); default: the parameter dtype.
      tokenizer: if given, ``tokenizer.save_pretrained(path)`` is called too.
    """
    if isinstance(path, ModelConfig):
        if out_path is None:
            raise ValueError("save_hf(model, cfg, path): path is missing")
        if path != model.cfg:
            raise ValueError("save_hf: the given cfg differs from model.cfg")
        path = out_path
    path = os.fspath(path)
    writer = jax.process_index() == 0
    with paths.staged_output(path) if writer else contextlib.nullcontext(None) as local:
        if writer and paths.is_uri(path) and paths.exists(path):  # an earlier save's weights would mix in
            for name in paths.listdir(path):
                if _is_weight_file(name):
                    paths.remove(paths.join(path, name))
        _save_hf(model, local, max_shard_size, dtype, tokenizer, writer)


def _is_weight_file(name: str) -> bool:
    return name in (SAFE_SINGLE, SAFE_INDEX) or re.fullmatch(r"model-\d+-of-\d+\.safetensors", name) is not None


def _save_hf(model: Decoder, path: str | None, max_shard_size, dtype, tokenizer, writer: bool) -> None:
    """:func:`save_hf` into a local directory (``path`` is None on the processes that only help gather)."""
    from safetensors.numpy import save_file

    limit = parse_size(max_shard_size)
    cfg = model.cfg
    out_dtype = np.dtype(dtype) if dtype is not None else None

    wmap = weight_map(cfg)
    params = [(_path_key(p), v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    # plan shards from shapes alone, in a stable order of stored names
    entries = []  # (first stored name, our key, var, total bytes)
    for key, var in params:
        if key not in wmap:
            raise ValueError(f"no checkpoint mapping for parameter {'/'.join(map(str, key))}")
        value = var.get_value()
        itemsize = (out_dtype or np.dtype(value.dtype)).itemsize
        entries.append((wmap[key].keys[0], key, var, math.prod(value.shape) * itemsize))
    entries.sort(key=lambda e: e[0])
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry[3] > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry[3]

    if writer:
        os.makedirs(path, exist_ok=True)
        hf_cfg = cfg.to_hf()
        hf_cfg.architectures = [type(hf_cfg).__name__.replace("Config", "ForCausalLM")]
        hf_cfg.dtype = str(jnp.dtype(out_dtype if out_dtype is not None else params[0][1].get_value().dtype))
        hf_cfg.save_pretrained(path)
        for name in os.listdir(path):  # weights of an earlier save would mix with these
            if _is_weight_file(name):
                os.remove(os.path.join(path, name))
    weight_index, total = {}, 0
    for i, shard in enumerate(shards):
        tensors: dict[str, np.ndarray] = {}
        for _, key, var, _ in shard:
            value = _host_value(var.get_value())
            if out_dtype is not None:
                value = value.astype(out_dtype)
            src = wmap[key]
            if src.stacked:
                tensors.update({t.key: t.write(value[j]) for j, t in enumerate(src.tensors)})
            else:
                tensors[src.tensors[0].key] = src.tensors[0].write(value)
        total += sum(t.nbytes for t in tensors.values())
        fname = SAFE_SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        weight_index.update({name: fname for name in tensors})
        if writer:
            save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
    if writer and len(shards) > 1:
        with open(os.path.join(path, SAFE_INDEX), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_index.items()))}, f,
                      indent=2)
    if writer and tokenizer is not None:
        tokenizer.save_pretrained(path)
