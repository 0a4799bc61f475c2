"""Reading a config: YAML files with inheritance (``base:`` / ``defaults:``) merged over the dataclass defaults,
then ``key=value`` command-line overrides, then :func:`validate`."""
from __future__ import annotations

import dataclasses
import os
import re

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .keys import explain, suggest
from .schema import ConfigError, TrainConfig
from .validation import validate

__all__ = ["load_config", "parse_override"]


def _as_list(value, key: str, path: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ConfigError(f"{key!r} in {path} must be a file name or a list of file names, got {value!r}")


def _read_yaml(path: str, seen: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """``[(file, mapping), ...]`` in merge order: inherited files (depth first) before the file itself."""
    path = os.path.abspath(path)
    if path in seen:
        chain = " -> ".join(os.path.basename(p) for p in seen + (path,))
        raise ConfigError(f"config inheritance cycle: {chain}")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level, got {type(data).__name__}")
    parents = _as_list(data.pop("base", None), "base", path) + _as_list(data.pop("defaults", None), "defaults", path)
    layers: list[tuple[str, dict]] = []
    for parent in parents:
        layers += _read_yaml(os.path.join(os.path.dirname(path), parent), seen + (path,))
    return layers + [(path, data)]


def parse_override(text: str):
    if "=" not in text:
        raise ConfigError(f"overrides must look like section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or key.startswith(("+", "~", "-")):
        raise ConfigError(f"overrides must look like section.key=value, got {text!r}")
    try:  # OmegaConf's YAML reading of the value (it knows 1e-3 is a float)
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))["v"]
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        reason = getattr(err, "problem", None) or " ".join(str(err).split())  # yaml's problem, without the marks
        raise ConfigError(f"cannot parse the value of override {text!r} as YAML ({reason}); quote a string, "
                          "close brackets: key='[1, 2]'") from None
    return key, value


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Build a :class:`TrainConfig` from the defaults, an optional YAML file and ``key=value`` overrides,
    then :func:`validate` it. Raises :class:`ConfigError` naming the offending key."""
    cfg = OmegaConf.structured(TrainConfig)
    if path is not None:
        for file, layer in _read_yaml(path):
            try:
                cfg = OmegaConf.merge(cfg, layer)
            except OmegaConfBaseException as err:
                raise explain(err, file) from None
    for text in overrides:
        key, value = parse_override(text)
        if re.split(r"[.\[]", key)[0] not in {f.name for f in dataclasses.fields(TrainConfig)}:
            close = suggest(key)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config key {key!r} in the command-line overrides{hint}")
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as err:
            raise explain(err, "the command-line overrides", key) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing required config value(s): {', '.join(missing)}")
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise explain(err, "the merged config") from None
    return validate(obj)
