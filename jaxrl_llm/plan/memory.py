"""Per-device memory figures of a plan, and the shapes of one RL step they are computed for."""
from __future__ import annotations

import dataclasses

from jaxrl_llm.trainer.sharing import prompt_sharing


@dataclasses.dataclass
class ProgramMemory:
    """One compiled program's memory analysis, bytes per device."""

    argument: int = 0
    output: int = 0
    alias: int = 0  # outputs written into donated arguments
    temp: int = 0
    code: int = 0

    @property
    def peak(self) -> int:
        """Arguments, outputs that do not reuse an argument, temporaries and code live together."""
        return self.argument + self.output - self.alias + self.temp + self.code

    @classmethod
    def of(cls, compiled) -> "ProgramMemory":
        m = compiled.memory_analysis()
        return cls(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes, alias=m.alias_size_in_bytes,
                   temp=m.temp_size_in_bytes, code=m.generated_code_size_in_bytes)


@dataclasses.dataclass
class MemoryPlan:
    """Per-device bytes of one configuration; ``method`` is ``compiled`` or ``analytic``."""

    method: str
    params: int  # the policy's parameters
    opt_state: int  # AdamW moments (and step counts)
    ref_params: int = 0  # frozen reference policy (kl_coef > 0)
    critic: int = 0  # the critic's parameters and optimizer state (advantage=gae)
    batch: int = 0  # the update's micro-batch inputs
    update_temp: int = 0  # gradients, activations, optimizer temporaries
    update_rest: int = 0  # the update's outputs not aliased to inputs (metrics), generated code
    sampler_copy: int = 0  # async rollouts: the weights the next rollout samples from
    disaggregated: bool = False  # sampling runs on devices of its own (rollout.sampler_devices)
    kv_cache: int = 0  # the sampler's KV cache (analytic; inside sample_temp when compiled)
    sample_temp: int = 0  # sampler: KV cache, logits, decode activations
    sample_io: int = 0  # sampler: prompts in, rollout out, code (and its own weights when disaggregated)
    score_temp: int = 0  # scoring: forward activations and log-prob chunks of a micro-batch of rollouts
    score_io: int = 0
    seconds: float = 0.0  # compile time
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def resident(self) -> int:
        """What the trainer's devices hold throughout a step."""
        return self.params + self.opt_state + self.ref_params + self.critic + self.sampler_copy

    @property
    def phases(self) -> dict[str, int]:
        """Peak per phase; sampling on the sampler's own devices holds nothing of the trainer's."""
        sampling = self.sample_temp + self.sample_io + (0 if self.disaggregated else self.resident)
        return {"update": self.resident + self.batch + self.update_temp + self.update_rest, "sampling": sampling,
                "scoring": self.resident + self.score_temp + self.score_io}

    @property
    def total(self) -> int:
        return max(self.phases.values())

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"phases": self.phases, "total": self.total}

    @classmethod
    def from_json(cls, d: dict) -> "MemoryPlan":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass(frozen=True)
class StepShapes:
    dp: int  # data-parallel size: mesh.data x mesh.fsdp
    prompt: int  # P: data.max_prompt_tokens
    response: int  # R: rollout.max_new_tokens (the trainer trims to the longest response: R is the worst case)
    rows: int  # responses per step: prompts_per_step x n
    micro: int  # rows per micro-batch
    num_micro: int  # micro-batches per minibatch
    score_micro: int  # rows per forward of the scoring passes


PLAN_PROMPT_TOKENS = 64  # the prompt length planned for when data.max_prompt_tokens is null


def step_shapes(cfg, sizes: dict[str, int]) -> StepShapes:
    rows = cfg.train.prompts_per_step * cfg.rollout.n
    # exact consistency's update runs the whole batch (trainer.update.Learner._minibatches)
    minibatch = rows if cfg.rollout.consistency == "exact" else rows // cfg.algorithm.minibatches
    return StepShapes(dp=sizes["data"] * sizes["fsdp"], prompt=cfg.data.max_prompt_tokens or PLAN_PROMPT_TOKENS,
                      response=cfg.rollout.max_new_tokens, rows=rows, micro=cfg.train.micro_batch_size,
                      num_micro=minibatch // cfg.train.micro_batch_size,
                      score_micro=min(rows, prompt_sharing(cfg).score_rows))
