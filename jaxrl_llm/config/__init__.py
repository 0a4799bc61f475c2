"""Typed run configuration: dataclasses, YAML files with inheritance, and ``key=value`` overrides (OmegaConf).

Merge order, later wins::

    dataclass defaults  <-  YAML file(s)  <-  command-line overrides ``section.key=value``

A YAML file may inherit from presets with ``base: grpo.yaml`` or ``defaults: [grpo.yaml, small.yaml]`` (paths
relative to the file itself; listed files are merged in order, then the file's own keys). Override values are
parsed as YAML (``3`` is an int, ``1e-3`` a float, ``null`` is None, ``[1, 2]`` a list, ``{a: 1}`` a mapping);
list items are addressed as ``reward.fns[0].weight=2``.

Unknown keys and ill-typed values are rejected naming the dotted key (with close matches suggested); then
:func:`validate` checks cross-field consistency (batch sizes that must divide, clip bounds, known names) and
again names the offending key. The structural typing is OmegaConf's; the choices and cross-field rules live here.

The package's modules, by concern: :mod:`.schema` (the section dataclasses, the reference of every setting),
:mod:`.names` (allowed values of choice settings, mesh and logical axes), :mod:`.loading` (YAML files and
overrides), :mod:`.keys` (dotted key names, suggestions), :mod:`.validation` (:func:`validate`) and
:mod:`.output` (YAML, dicts, summary).
"""
from __future__ import annotations

from .keys import config_keys
from .loading import load_config, parse_override
from .names import (
    ADVANTAGES, AGG_MODES, ATTENTION, CONSISTENCY, COV_PENALTIES, CRITICS, DTYPES, GROUP_ADVANTAGES, KL_ESTIMATORS,
    LOGICAL_AXES, MESH_AXES, POLICY_LOSSES, REMAT, ROLLOUT_IS, ROLLOUT_MASK, SCHEDULES, SOURCES, TASKS, TRUNCATE,
)
from .output import save_config, summary, to_dict, to_yaml
from .schema import (
    AlgorithmSection, CheckpointSection, ConfigError, DataSection, EvalDataSection, EvalSection, LogSection,
    MeshSection, ModelSection, RewardSection, RewardSpec, RolloutSection, TrainConfig, TrainSection, mesh_sizes,
)
from .validation import validate

__all__ = [
    "TrainConfig", "ModelSection", "DataSection", "RolloutSection", "AlgorithmSection", "TrainSection",
    "MeshSection", "CheckpointSection", "LogSection", "RewardSpec", "RewardSection", "EvalSection",
    "EvalDataSection", "ConfigError", "load_config", "parse_override", "validate", "to_yaml", "to_dict",
    "save_config", "summary", "config_keys", "mesh_sizes", "TRUNCATE",
    "POLICY_LOSSES", "AGG_MODES", "KL_ESTIMATORS", "ADVANTAGES", "GROUP_ADVANTAGES", "CRITICS", "DTYPES",
    "REMAT", "ATTENTION", "SOURCES", "TASKS", "SCHEDULES", "CONSISTENCY", "COV_PENALTIES", "ROLLOUT_IS",
    "ROLLOUT_MASK", "MESH_AXES", "LOGICAL_AXES",
]
