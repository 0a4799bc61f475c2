"""The plan of a configuration as a report: compiled and analytic figures, the verdict, suggestions."""
from __future__ import annotations

import dataclasses
import json
import sys
import textwrap

from jaxrl_llm.plan.analytic import analytic_plan
from jaxrl_llm.plan.inputs import (ACCELERATORS, PlanError, accelerator_memory, fmt_bytes, load_plan_config,
                                  mesh_text, parse_mesh, resolve_mesh, resolve_model, with_model)
from jaxrl_llm.plan.memory import PLAN_PROMPT_TOKENS, MemoryPlan, StepShapes, step_shapes
from jaxrl_llm.plan.search import (Variant, combined_variant, evaluate, mesh_overrides, result_json, run_here,
                                   run_subprocess, suggestion_groups, compile_location)


@dataclasses.dataclass
class Suggestion:
    label: str
    plan: MemoryPlan | None
    compiled: bool
    fits: bool | None
    error: str | None = None  # the variant could not be compiled


@dataclasses.dataclass
class Report:
    model: str
    num_params: int
    config: str | None
    mesh: dict[str, int]
    devices: int  # the mesh's and the sampler's own
    sampler_devices: int
    accelerator: str | None
    hbm: int | None
    usable: int | None
    shapes: StepShapes
    param_dtype: str
    analytic: MemoryPlan
    compiled: MemoryPlan | None
    backend: str = ""
    suggestions: list[Suggestion] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def best(self) -> MemoryPlan:
        return self.compiled or self.analytic

    @property
    def fits(self) -> bool | None:
        return None if self.usable is None else self.best.total <= self.usable

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["analytic"] = self.analytic.to_json()
        out["compiled"] = self.compiled.to_json() if self.compiled else None
        out["suggestions"] = [dict(dataclasses.asdict(x), plan=x.plan and x.plan.to_json()) for x in self.suggestions]
        return out | {"fits": self.fits, "total": self.best.total}


def _discrepancy_notes(a: MemoryPlan, c: MemoryPlan) -> list[str]:
    """Where the trainer's compiled programs need much more than the formula, which assumes the optimizer state
    sharded like the parameters and rows split over data x fsdp (heads and MLP columns over tensor)."""
    notes = []
    if c.opt_state > 1.5 * a.opt_state:
        notes.append("the optimizer state takes more than twice the parameters: some of it is not sharded like the "
                     "parameters")
    for name, what in (("update_temp", "the update"), ("sample_temp", "sampling"), ("score_temp", "scoring")):
        ratio = getattr(c, name) / max(getattr(a, name), 1)
        if ratio > 2:
            notes.append(f"{what} needs {ratio:.0f}x the estimated temporaries: the compiled program holds buffers "
                         "the formula does not count (XLA_FLAGS=--xla_dump_to=DIR writes its buffer assignment; "
                         "docs/scaling.md lists the causes found)")
    return notes


def plan(config: str | None, overrides=(), *, mesh: str | None = None, devices: int | None = None,
         model: str | None = None, accelerator: str | None = None, analytic_only: bool = False,
         timeout: float = 600.0, backend: str = "auto", suggest: bool = True,
         mem_fraction: float | None = None, progress=None) -> Report:
    """Plan the memory of ``config`` (+ ``overrides``) on a mesh; see the module docstring.

    Raises :class:`PlanError` for a mesh that does not match ``devices``, an unknown accelerator or model, or a
    config error.
    """
    if accelerator is not None and accelerator not in ACCELERATORS:
        raise PlanError(f"unknown accelerator {accelerator!r}; known: {', '.join(ACCELERATORS)}")
    if backend not in ("auto", "local", "cpu"):
        raise PlanError(f"backend must be auto, local or cpu, got {backend!r}")
    overrides = list(overrides)
    from jaxrl_llm.config import ConfigError, load_config, mesh_sizes

    try:  # the mesh section and the sampler's own devices, before the mesh is checked against the devices
        given = load_config(config, with_model(overrides, model))
    except ConfigError as err:
        raise PlanError(f"config: {err}") from None
    k = given.rollout.sampler_devices
    sizes, n = resolve_mesh(parse_mesh(mesh) if mesh else mesh_sizes(given), devices, k)
    hbm, usable = accelerator_memory(accelerator, n + k)
    if usable is not None and mem_fraction is not None:
        if not 0 < mem_fraction <= 1:
            raise PlanError(f"--mem-fraction must be in (0, 1], got {mem_fraction}")
        usable = int(hbm * mem_fraction)
    cfg = load_plan_config(config, overrides + mesh_overrides(sizes), model, n)
    spec = model or cfg.model.path
    mc = resolve_model(spec)
    report = Report(model=spec, num_params=mc.num_params(), config=config, mesh=sizes, devices=n + k,
                    sampler_devices=k,
                    accelerator=accelerator, hbm=hbm, usable=usable, shapes=step_shapes(cfg, sizes),
                    param_dtype=cfg.model.param_dtype, analytic=analytic_plan(cfg, mc, sizes), compiled=None)
    groups = suggestion_groups(cfg, sizes) if suggest and usable is not None else []
    results = {}
    if cfg.data.max_prompt_tokens is None:  # a run derives it from its data at start; a plan reads no data
        report.notes.append(f"data.max_prompt_tokens is null (a run derives it from its data): planned for "
                            f"{PLAN_PROMPT_TOKENS} prompt tokens; give the length of your prompts")
    if analytic_only:
        report.notes.append("analytic estimate only (--analytic)")
    else:
        results = _compile_into(report, config, overrides, spec, groups, timeout, backend, progress)
    _add_suggestions(report, config, overrides, spec, mc, groups, results)
    return report


def _compile_into(report: Report, config, overrides, spec, groups, timeout, backend, progress) -> dict:
    """Compile the base plan (and the suggestions while it does not fit) into ``report``; returns every result by
    key."""
    base = Variant("as given", [], report.mesh)
    request = {"config": config, "overrides": overrides, "model": spec, "base": dataclasses.asdict(base),
               "groups": [[dataclasses.asdict(v) for v in g] for g in groups], "limit": report.usable}
    # suggestions on more devices than this process has fall back to estimates; a subprocess gets enough
    most = max([report.devices] + [v.devices + report.sampler_devices for g in groups for v in g])
    if compile_location(backend, report.devices) == "here":
        import jax

        kind = jax.devices()[0].device_kind
        report.backend = f"{report.devices} local {kind} devices"
        if progress:
            progress(f"compiling on {report.backend} ...")
        results, problem = run_here(request), None
    else:
        report.backend = f"{report.devices} fake CPU devices"
        report.notes.append("compiled by XLA:CPU on fake devices: TPU/GPU compilers fuse, schedule and lay out "
                            "memory differently, so the compiled figures approximate theirs; XLA:CPU also widens "
                            "the bfloat16 weights it gathers to float32 (the sampler's unembedding copy among them), "
                            "which TPU/GPU compilers keep in bfloat16 (docs/scaling.md)")
        if progress:
            progress(f"compiling on {most} fake CPU devices in a subprocess (timeout {timeout:g} s) ...")
        results, problem = run_subprocess(request, most, timeout)
    got = results.get("base")
    if got and got.get("plan"):
        report.compiled = MemoryPlan.from_json(got["plan"])
        report.notes += report.compiled.notes + _discrepancy_notes(report.analytic, report.compiled)
    elif got and got.get("error"):  # e.g. a setting the trainer's programs do not support yet
        report.notes.insert(0, f"{got['error']}; the figures are analytic estimates")
    if problem:
        what = "; the figures below are analytic estimates" if report.compiled is None else \
            "; suggestions not compiled in time are analytic estimates"
        report.notes.append(problem + what)
    return results


def _add_suggestions(report: Report, config, overrides, spec, mc, groups, results: dict) -> None:
    """For each group, the first alternative that fits (compiled when the compilation got to it), then every
    lever at once."""
    if not groups or report.fits is not False:
        return
    for i, group in enumerate(groups):
        chosen = None
        for j, v in enumerate(group):
            chosen = _suggestion(report, config, overrides, spec, mc, v, results.get(f"{i}.{j}"))
            if chosen is not None and chosen.fits:
                break
        if chosen is not None:
            report.suggestions.append(chosen)
    got = results.get("combined")
    combined = Variant(**got["variant"]) if got else combined_variant(groups, report.mesh)
    if combined is not None:
        chosen = _suggestion(report, config, overrides, spec, mc, combined, got)
        if chosen is not None:
            report.suggestions.append(chosen)


def _suggestion(report: Report, config, overrides, spec, mc, v: Variant, got: dict | None) -> Suggestion | None:
    """A compiled result, a compile error, or (not compiled in time) an estimate; None for an invalid config."""
    if got and got.get("plan"):
        plan_ = MemoryPlan.from_json(got["plan"])
        return Suggestion(v.label, plan_, True, plan_.total <= report.usable)
    if got and got.get("error"):
        return Suggestion(v.label, None, True, False, got["error"])
    try:
        cfg = load_plan_config(config, overrides + mesh_overrides(v.mesh) + v.overrides, spec, v.devices)
    except PlanError:
        return None
    plan_ = analytic_plan(cfg, mc, v.mesh)
    if report.compiled is not None:
        # keep the extra (unsharded) memory the compiled base plan revealed
        plan_ = _scaled_like(plan_, report.analytic, report.compiled)
    return Suggestion(v.label, plan_, False, plan_.total <= report.usable)


_SCALED = ("opt_state", "update_temp", "sample_temp", "score_temp")


def _scaled_like(plan_: MemoryPlan, analytic: MemoryPlan, compiled: MemoryPlan, names=_SCALED) -> MemoryPlan:
    """An analytic variant scaled, term by term, by the compiled/analytic ratio of the base configuration."""
    out = dataclasses.replace(plan_, notes=[])
    for name in names:
        a = getattr(analytic, name)
        if a:
            setattr(out, name, int(getattr(plan_, name) * getattr(compiled, name) / a))
    out.method = "analytic, scaled"
    return out


def _row(label: str, analytic: int | None, compiled: int | str | None, with_compiled: bool) -> str:
    a = "-" if not analytic else fmt_bytes(analytic)
    c = compiled if isinstance(compiled, str) else "-" if not compiled else fmt_bytes(compiled)
    return f"  {label:<46}{a:>12}" + (f"{c:>13}" if with_compiled else "")


def format_report(r: Report) -> str:
    """The human-readable plan."""
    a, c, s = r.analytic, r.compiled, r.shapes
    both = c is not None
    src = f" with {r.config}" if r.config else ""
    acc = "no accelerator given (--accelerator)" if r.accelerator is None else \
        f"accelerator {r.accelerator}: {fmt_bytes(r.hbm)} HBM per device" + \
        (f", {fmt_bytes(r.usable)} usable by JAX" if r.usable != r.hbm else "")
    own = f" + {r.sampler_devices} sampler devices" if r.sampler_devices else ""
    size = f"{r.num_params / 1e9:.2f} B" if r.num_params >= 1e8 else f"{r.num_params / 1e6:.2f} M"
    lines = [f"Memory plan for {r.model} ({size} parameters){src}",
             f"mesh {mesh_text(r.mesh)}{own} ({r.devices} devices); {acc}",
             f"step: {s.rows} rows of {s.prompt} prompt + {s.response} response tokens; micro-batches of {s.micro} "
             f"rows ({max(s.micro // s.dp, 1)} per device), {s.num_micro} per minibatch"]
    if both:
        lines.append(f"compiled ahead of time on {r.backend} in {c.seconds:.0f} s")
    lines += ["", f"  {'per device':<46}{'analytic':>12}" + (f"{'compiled':>13}" if both else "")]
    get = (lambda name: getattr(c, name)) if both else (lambda name: None)
    rows = [(f"parameters ({r.param_dtype})", "params"), ("optimizer state (AdamW mu, nu)", "opt_state"),
            ("reference policy (kl_coef > 0)", "ref_params"), ("critic (parameters + optimizer)", "critic"),
            ("sampler's copy of the weights (async)", "sampler_copy"), ("update: micro-batch inputs", "batch"),
            ("update: gradients, activations (temp)", "update_temp")]
    for label, name in rows:
        if name != "sampler_copy" or a.sampler_copy:
            lines.append(_row(label, getattr(a, name), get(name), both))
    where = "sampler devices" if a.disaggregated else "sampler"
    lines.append(_row(f"{where}: KV cache ({s.rows} rows x {s.prompt + s.response} slots)", a.kv_cache, "in temp",
                      both))
    if a.disaggregated:
        lines.append(_row("sampler devices: weights (replicated)", a.sample_io, get("sample_io"), both))
    lines.append(_row(f"{where}: temp (KV, logits, decode)", a.sample_temp, get("sample_temp"), both))
    lines.append(_row(f"scoring: temp ({s.score_micro} rows per forward)", a.score_temp, get("score_temp"), both))
    for phase, value in a.phases.items():
        label = f"peak during {phase}" + (" (sampler devices)" if phase == "sampling" and a.disaggregated else "")
        lines.append(_row(label, value, c.phases[phase] if both else None, both))
    lines.append(_row("total (largest peak)", a.total, c.total if both else None, both))
    lines += ["", _verdict(r)]
    if r.notes:
        lines += ["", "notes:"] + [textwrap.fill(n, 116, initial_indent="  - ", subsequent_indent="    ")
                                   for n in r.notes]
    if r.suggestions:
        lines += ["", "suggestions, each re-evaluated on its own (of each kind the first that fits, else the "
                      "last tried):"]
        for sug in r.suggestions:
            lines += _suggestion_lines(sug)
    return "\n".join(lines)


def _suggestion_lines(sug: Suggestion) -> list[str]:
    """``label  total  verdict`` and, indented, the peak of each phase (which phase a change helps)."""
    if sug.plan is None:
        error = sug.error.split(" (http")[0]  # drop documentation links
        return [f"  {sug.label:<62}fails: {error[:110]}"]
    how = "compiled" if sug.compiled else sug.plan.method
    phases = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sug.plan.phases.items())
    return [f"  {sug.label:<62}{fmt_bytes(sug.plan.total):>11}  {'fits' if sug.fits else 'does not fit'} ({how})",
            f"      peaks: {phases}"]


def _verdict(r: Report) -> str:
    total = r.best.total
    basis = "compiled" if r.compiled else "analytic"
    if r.usable is None:
        return f"total {fmt_bytes(total)} per device ({basis}); pass --accelerator to check it against HBM"
    if r.fits:
        return (f"fits {r.accelerator}: {fmt_bytes(total)} of {fmt_bytes(r.usable)} per device ({basis}, "
                f"{100 * total / r.usable:.0f}% used)")
    return (f"does NOT fit {r.accelerator}: {fmt_bytes(total)} needed per device ({basis}), "
            f"{fmt_bytes(r.usable)} available")


def run_cli(args) -> int:
    """``jaxrl-llm plan``: print the plan; exit code 0 when it fits (or no accelerator was named), 1 when not."""
    report = plan(args.config, args.overrides, mesh=args.mesh, devices=args.devices, model=args.model_config,
                  accelerator=args.accelerator, analytic_only=args.analytic, timeout=args.timeout,
                  backend=args.backend, suggest=not args.no_suggest, mem_fraction=args.mem_fraction,
                  progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(json.dumps(report.to_json(), indent=1) if args.json else format_report(report))
    return 1 if report.fits is False else 0


def worker() -> int:
    """Subprocess side of :func:`_run_subprocess`: a request on stdin, one JSON line per result on stdout."""
    request = json.loads(sys.stdin.read())

    def emit(key, variant, result, error):
        print(json.dumps(result_json(key, variant, result, error)), flush=True)

    evaluate(request, emit)
    return 0
