"""Writing a config out: YAML, plain dicts for trackers, and a human-readable summary of the run."""
from __future__ import annotations

from omegaconf import OmegaConf

from .names import CLIPPED_LOSSES
from .schema import TrainConfig

__all__ = ["to_yaml", "to_dict", "save_config", "summary"]


def to_yaml(cfg: TrainConfig) -> str:
    """The full config as YAML; :func:`load_config` on it gives an equal config."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: TrainConfig) -> dict:
    """The full config as nested plain dicts (for trackers)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def save_config(cfg: TrainConfig, path: str) -> None:
    """Write :func:`to_yaml` to ``path``, a local path or a URI (parent directories are created)."""
    from jaxrl_llm import paths

    paths.write_text(path, to_yaml(cfg))


def summary(cfg: TrainConfig) -> str:
    """A few human-readable lines describing the run (for logs and the start of a run)."""
    a, r, t = cfg.algorithm, cfg.rollout, cfg.train
    rows = t.prompts_per_step * r.n
    clip = f"clip [{1 - a.clip_low:g}, {1 + a.clip_high:g}]" if a.policy_loss in CLIPPED_LOSSES else "no clip"
    if a.dual_clip is not None:
        clip += f", dual {a.dual_clip:g}"
    kl = (f"KL {a.kl_estimator} x {a.kl_coef:g} {'in reward' if a.kl_in_reward else 'in loss'}"
          if a.kl_coef > 0 else "no KL")
    extras = [x for x, on in (("dynamic sampling", a.dynamic_sampling),
                              (f"overlong penalty (cache {a.overlong_cache})", a.overlong_penalty)) if on]
    data = (f"task {cfg.data.task}" if cfg.data.source == "task" else f"{cfg.data.source} {cfg.data.path}")
    rewards = " + ".join(f"{s.weight:g}*{s.name}" for s in cfg.reward.fns)
    lines = [
        f"{a.name}: {a.policy_loss} ({clip}), {a.loss_agg}, advantage {a.advantage}, {kl}"
        + (f", {', '.join(extras)}" if extras else ""),
        f"model {cfg.model.path} ({cfg.model.dtype}); data {data}; reward {rewards}",
        f"{t.steps} steps x {t.prompts_per_step} prompts x {r.n} samples = {rows} responses/step, "
        f"{a.ppo_epochs} epoch(s) x {a.minibatches} minibatch(es) of {rows // a.minibatches}, "
        f"micro-batch {t.micro_batch_size}, lr {t.lr:g} ({t.schedule}, warm-up {t.warmup_steps})",
        f"run dir {cfg.log.run_dir}",
    ]
    return "\n".join(lines)
