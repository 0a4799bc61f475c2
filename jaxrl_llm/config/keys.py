"""Dotted key names of the schema, close-match suggestions for unknown keys, and OmegaConf errors turned into
:class:`ConfigError` naming the full key."""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing

from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from .schema import ConfigError, TrainConfig

__all__ = ["config_keys", "suggest", "explain"]


def _field_type(cls, name: str):
    return typing.get_type_hints(cls)[name]


def config_keys(cls=TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (list items as ``reward.fns[].name``)."""
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        out.append(key)
        tp = _field_type(cls, f.name)
        if dataclasses.is_dataclass(tp):
            out += config_keys(tp, key + ".")
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            out += config_keys(typing.get_args(tp)[0], key + "[].")
    return out


def _section_class(path: list[str]):
    """The dataclass addressed by a key path (list indices are skipped), or None when it is not a dataclass."""
    cls = TrainConfig
    for part in path:
        if not dataclasses.is_dataclass(cls) or part not in {f.name for f in dataclasses.fields(cls)}:
            return None
        tp = _field_type(cls, part)
        if typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        cls = tp
    return cls if dataclasses.is_dataclass(cls) else None


def _split_key(key: str) -> list[str]:
    return [p for p in re.split(r"[.\[\]]", key) if p and not p.isdigit()]


def suggest(key: str) -> list[str]:
    """Close matches for an unknown dotted key: siblings of the last part first, then any key in the schema."""
    parts = _split_key(key)
    if not parts:
        return []
    prefix = key[: len(key) - len(parts[-1])] if key.endswith(parts[-1]) else ""
    cls = _section_class(parts[:-1])
    if cls is not None:
        names = [f.name for f in dataclasses.fields(cls)]
        close = difflib.get_close_matches(parts[-1], names, n=3, cutoff=0.6)
        if close:
            return [prefix + c for c in close]
    every = [k.replace("[]", "") for k in config_keys()]
    by_leaf = [k for k in every if k.rsplit(".", 1)[-1] == parts[-1]]
    return by_leaf[:3] or difflib.get_close_matches(key, every, n=3, cutoff=0.6)


def explain(err: OmegaConfBaseException, where: str, key: str | None = None) -> ConfigError:
    """A :class:`ConfigError` naming the full dotted key of an OmegaConf error."""
    inner = str(getattr(err, "full_key", "") or getattr(err, "key", "") or "")
    if key and inner and not inner.startswith(key):
        full = f"{key}.{inner}" if not inner.startswith("[") else key + inner
    else:
        full = inner or key or "?"
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)) and "not in" in str(err):
        close = suggest(full)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return ConfigError(f"unknown config key {full!r} in {where}{hint}")
    msg = str(getattr(err, "msg", err)).splitlines()[0]
    if isinstance(err, ValidationError):
        return ConfigError(f"invalid value for {full!r} in {where}: {msg}")
    return ConfigError(f"config error at {full!r} in {where}: {msg}")
