"""Hugging Face checkpoints in and out: config.json + safetensors (single file or sharded with an index).

Loading builds the model abstractly (no random init), then creates every parameter directly with its final
sharding: each tensor is read once on the host, converted to the JAX layout and handed to
``jax.make_array_from_callback``, which gives every device only its own shard. Every expected tensor must be
present with the expected shape; anything missing, misshapen or unexpected is an error naming the tensor.
Nothing is ever silently left randomly initialised.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np
from flax import nnx

from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.decoder import Decoder

__all__ = ["load_hf", "save_hf", "load_config", "read_safetensors_index", "weight_map"]

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# tensors some exporters write that carry no parameters
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

Path = tuple  # an nnx state path, e.g. ("layers", 0, "attn", "q")


def _t(x):
    return np.ascontiguousarray(x.T)


def weight_map(cfg: ModelConfig) -> dict[Path, tuple[list[str], Callable, Callable]]:
    """``our path -> (hf keys, from_hf(list of arrays) -> ours, to_hf(ours) -> list of arrays)``.

    HF linear weights are ``[out, in]``; ours are ``[in, ...out]`` (heads split out for attention).
    """
    d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    m: dict[Path, tuple[list[str], Callable, Callable]] = {}

    def same(path, key):
        m[path] = ([key], lambda xs: xs[0], lambda x: [x])

    def linear(path, key, in_dim, out_shape):
        m[path] = ([key], lambda xs: _t(xs[0]).reshape((in_dim,) + out_shape),
                   lambda x: [_t(x.reshape(in_dim, -1))])

    same(("embed",), "model.embed_tokens.weight")
    same(("norm", "weight"), "model.norm.weight")
    if not cfg.tie_word_embeddings:
        m[("lm_head",)] = (["lm_head.weight"], lambda xs: _t(xs[0]), lambda x: [_t(x)])
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        L = ("layers", i)
        same(L + ("attn_norm", "weight"), p + "input_layernorm.weight")
        same(L + ("mlp_norm", "weight"), p + "post_attention_layernorm.weight")
        linear(L + ("attn", "q"), p + "self_attn.q_proj.weight", d, (h, hd))
        linear(L + ("attn", "k"), p + "self_attn.k_proj.weight", d, (kv, hd))
        linear(L + ("attn", "v"), p + "self_attn.v_proj.weight", d, (kv, hd))
        m[L + ("attn", "o")] = ([p + "self_attn.o_proj.weight"], lambda xs: _t(xs[0]).reshape(h, hd, d),
                                lambda x: [_t(x.reshape(h * hd, d))])
        if cfg.qkv_bias:
            for name, heads in (("q", h), ("k", kv), ("v", kv)):
                m[L + ("attn", f"{name}_bias")] = (
                    [p + f"self_attn.{name}_proj.bias"],
                    lambda xs, heads=heads: xs[0].reshape(heads, hd), lambda x: [x.reshape(-1)])
        if cfg.o_bias:
            same(L + ("attn", "o_bias"), p + "self_attn.o_proj.bias")
        if cfg.qk_norm:
            same(L + ("attn", "q_norm", "weight"), p + "self_attn.q_norm.weight")
            same(L + ("attn", "k_norm", "weight"), p + "self_attn.k_norm.weight")
        if cfg.layer_is_moe(i):
            e = cfg.num_experts
            m[L + ("mlp", "router")] = ([p + "mlp.gate.weight"], lambda xs: _t(xs[0]), lambda x: [_t(x)])
            for name in ("gate", "up", "down"):
                keys = [p + f"mlp.experts.{j}.{name}_proj.weight" for j in range(e)]
                m[L + ("mlp", name)] = (
                    keys, lambda xs: np.stack([_t(x) for x in xs]), lambda x: [_t(x[j]) for j in range(x.shape[0])])
        else:
            for name in ("gate", "up", "down"):
                m[L + ("mlp", name)] = ([p + f"mlp.{name}_proj.weight"], lambda xs: _t(xs[0]), lambda x: [_t(x)])
    return m


def _fused_expert_aliases(cfg: ModelConfig) -> dict[str, tuple[str, Callable]]:
    """Per-expert HF keys that may instead be stored fused (``experts.gate_up_proj [E, 2F, D]``,
    ``experts.down_proj [E, D, F]``): key -> (fused key, extractor)."""
    out = {}
    f = cfg.moe_intermediate_size
    for i in range(cfg.num_layers):
        if not cfg.layer_is_moe(i):
            continue
        p = f"model.layers.{i}.mlp.experts."
        for j in range(cfg.num_experts):
            out[p + f"{j}.gate_proj.weight"] = (p + "gate_up_proj", lambda x, j=j: x[j, :f])
            out[p + f"{j}.up_proj.weight"] = (p + "gate_up_proj", lambda x, j=j: x[j, f:])
            out[p + f"{j}.down_proj.weight"] = (p + "down_proj", lambda x, j=j: x[j])
    return out


def read_safetensors_index(path: str) -> dict[str, str]:
    """``tensor name -> file`` for a checkpoint directory (single file or sharded index)."""
    index = os.path.join(path, SAFE_INDEX)
    single = os.path.join(path, SAFE_SINGLE)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            try:
                mapping = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"corrupt safetensors index {index}: {err}") from err
        return {k: os.path.join(path, v) for k, v in mapping.items()}
    if os.path.exists(single):
        from safetensors import safe_open

        try:
            with safe_open(single, "np") as f:
                return {k: single for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"cannot read safetensors file {single}: {err}") from err
    raise FileNotFoundError(f"no {SAFE_SINGLE} or {SAFE_INDEX} in {path}")


class _TensorReader:
    """Reads named tensors from the files of a checkpoint, keeping each file open once."""

    def __init__(self, mapping: Mapping[str, str]):
        self.mapping = mapping
        self._files = {}

    def get(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        file = self.mapping[name]
        if file not in self._files:
            if not os.path.exists(file):
                raise FileNotFoundError(f"tensor {name!r} is mapped to {file}, which does not exist")
            try:
                self._files[file] = safe_open(file, "np")
            except Exception as err:
                raise ValueError(f"cannot read safetensors file {file} (needed for {name!r}): {err}") from err
        try:
            return self._files[file].get_tensor(name)
        except Exception as err:
            raise ValueError(f"cannot read tensor {name!r} from {file}: {err}") from err


def load_config(path: str) -> ModelConfig:
    import transformers

    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no config.json in {path}")
    return ModelConfig.from_hf(transformers.AutoConfig.from_pretrained(path))


def _path_key(path) -> Path:
    return tuple(p.key if hasattr(p, "key") else p.idx if hasattr(p, "idx") else p for p in path)


def load_hf(path: str, *, mesh=None, rules=None, dtype=jnp.float32, param_dtype=jnp.float32,
            remat: str = "none") -> tuple[Decoder, ModelConfig]:
    """Load a Hugging Face checkpoint directory into a :class:`Decoder` (sharded on ``mesh`` if given)."""
    from jaxrl_llm.parallel import state_shardings

    cfg = load_config(path)
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                              remat=remat))
    graphdef, state = nnx.split(abstract)
    if mesh is not None:
        shardings = state_shardings(state, mesh, rules)
    else:
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: single, state, is_leaf=lambda x: isinstance(x, nnx.Variable))

    mapping = read_safetensors_index(path)
    reader = _TensorReader(mapping)
    aliases = _fused_expert_aliases(cfg)
    fused_cache: dict[str, np.ndarray] = {}

    def fetch(name: str) -> np.ndarray:
        if name in mapping:
            return reader.get(name)
        if name in aliases and aliases[name][0] in mapping:
            fused, extract = aliases[name]
            if fused not in fused_cache:
                fused_cache[fused] = reader.get(fused)
            return extract(fused_cache[fused])
        raise ValueError(f"checkpoint {path} is missing tensor {name!r}")

    wmap = weight_map(cfg)
    used: set[str] = set()
    flat_state = dict(nnx.to_flat_state(state))
    flat_shard = dict(nnx.to_flat_state(shardings)) if hasattr(nnx, "to_flat_state") else None
    new_values = {}
    for raw_path, var in flat_state.items():
        key = _path_key(raw_path)
        if key not in wmap:
            raise ValueError(f"no checkpoint mapping for parameter {'/'.join(map(str, key))}")
        names, from_hf, _ = wmap[key]
        arrays = [fetch(n) for n in names]
        used.update(names)
        value = np.asarray(from_hf(arrays))
        shape = tuple(var.get_value().shape)
        if value.shape != shape:
            raise ValueError(f"tensor {names[0]!r} has shape {arrays[0].shape}, which does not match the config "
                             f"(parameter {'/'.join(map(str, key))} expects {shape})")
        value = value.astype(var.get_value().dtype)
        sharding = flat_shard[raw_path]
        sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
        new_values[raw_path] = jax.make_array_from_callback(shape, sharding, lambda idx, v=value: v[idx])
    unexpected = sorted(n for n in mapping if n not in used and not n.endswith(_IGNORED_SUFFIXES)
                        and not any(a[0] == n for a in aliases.values()))
    if unexpected:
        raise ValueError(f"checkpoint {path} has tensors the config does not use: {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    for raw_path, var in flat_state.items():
        var.set_value(new_values[raw_path])
    model = nnx.merge(graphdef, state)
    return model, cfg


def save_hf(model: Decoder, path: str, *, max_shard_size: int = 2 * 1024**3, dtype=None,
            tokenizer=None) -> None:
    """Write ``config.json`` and safetensors (sharded with an index above ``max_shard_size`` bytes)."""
    from safetensors.numpy import save_file

    cfg = model.cfg
    os.makedirs(path, exist_ok=True)
    hf_cfg = cfg.to_hf()
    out_dtype = np.dtype(dtype) if dtype is not None else None
    if out_dtype is not None:
        hf_cfg.dtype = str(jnp.dtype(out_dtype))
    hf_cfg.save_pretrained(path)
    wmap = weight_map(cfg)
    tensors: dict[str, np.ndarray] = {}
    for raw_path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = _path_key(raw_path)
        names, _, to_hf = wmap[key]
        value = np.asarray(jax.device_get(var.get_value()))
        if out_dtype is not None:
            value = value.astype(out_dtype)
        for name, arr in zip(names, to_hf(value)):
            tensors[name] = np.ascontiguousarray(arr)
    # shard greedily in a stable order
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    for stale in (SAFE_SINGLE, SAFE_INDEX):
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, SAFE_SINGLE), metadata={"format": "pt"})
    else:
        weight_index = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
            weight_index.update({name: fname for name in shard})
        total = sum(t.nbytes for t in tensors.values())
        with open(os.path.join(path, SAFE_INDEX), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_index}, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
