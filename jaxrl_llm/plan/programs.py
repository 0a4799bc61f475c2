"""The trainer's programs lowered and compiled ahead of time on abstract inputs, and XLA's memory analysis of
each."""
from __future__ import annotations

import dataclasses
import math
import time

from jaxrl_llm.plan.analytic import analytic_plan
from jaxrl_llm.plan.inputs import PlanError, fmt_bytes, mesh_text
from jaxrl_llm.plan.memory import MemoryPlan, ProgramMemory, StepShapes, step_shapes


def _shard_bytes(x) -> int:
    """Bytes of the shard of ``x`` (an abstract array with a sharding) held by one device."""
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return math.prod(shape) * x.dtype.itemsize


def _tree_bytes(tree) -> int:
    import jax

    return sum(_shard_bytes(x) for x in jax.tree.leaves(tree))


def _abstract(shape, dtype, sharding=None):
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _abstract_policy(cfg, mc, layout):
    """``(model, graphdef, params, rest)`` of the policy as the trainer holds it: abstract arrays with the
    shardings :func:`jaxrl_llm.models.load_hf` gives them on ``layout``."""
    from flax import nnx

    from jaxrl_llm.models import Decoder
    from jaxrl_llm.models.remat import resolve_remat
    from jaxrl_llm.trainer.rl import DTYPES

    model = nnx.eval_shape(lambda: Decoder(mc, rngs=nnx.Rngs(0), dtype=DTYPES[cfg.model.dtype],
                                           param_dtype=DTYPES[cfg.model.param_dtype],
                                           remat=resolve_remat(cfg.model.remat, cfg.rollout.max_new_tokens),
                                           attention=cfg.model.attention))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    for state in (params, rest):
        shardings = dict(nnx.to_flat_state(layout.params(state)))
        for path, var in nnx.to_flat_state(state):
            sharding = shardings[path]
            sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
            value = var.get_value()
            var.set_value(_abstract(value.shape, value.dtype, sharding))
    return model, graphdef, params, rest


def _abstract_opt_state(optimizer, params, layout):
    """The optimizer state as the trainer places it (``opt_state_shardings``: moments sharded like their
    parameters, step counts replicated)."""
    import jax

    from jaxrl_llm.trainer.optim import opt_state_shardings

    shapes = jax.eval_shape(optimizer.init, params)
    shardings = opt_state_shardings(optimizer, params, layout.replicated())
    return jax.tree.map(lambda x, s: _abstract(x.shape, x.dtype, s), shapes, shardings)


def _micro_batches(cfg, mc, layout, s: StepShapes):
    """The update's input: an Experience ``[num_micro, micro, ...]`` placed as the trainer places it, at its
    largest (full-length responses; packing that puts no two responses in a row)."""
    import jax
    import jax.numpy as jnp

    from jaxrl_llm.trainer.packing import Packing, packed_rows, packed_rows_multiple
    from jaxrl_llm.trainer.sharing import prompt_sharing
    from jaxrl_llm.trainer.step import Experience
    from jaxrl_llm.trainer.update import micro_shardings

    a = cfg.algorithm
    lead = (s.num_micro, s.micro)
    f32 = lambda: _abstract(lead + (s.response,), jnp.float32)  # noqa: E731
    fields = dict(prompt_ids=_abstract(lead + (s.prompt,), jnp.int32),
                  prompt_mask=_abstract(lead + (s.prompt,), jnp.bool_),
                  tokens=_abstract(lead + (s.response,), jnp.int32),
                  mask=_abstract(lead + (s.response,), jnp.bool_),
                  advantages=f32(), old_logp=f32(), sampler_logp=f32())
    if a.kl_coef > 0 and not a.kl_in_reward:
        fields["ref_logp"] = f32()
    if a.rollout_is != "none" or a.rollout_mask != "none":
        fields["is_weights"] = f32()
    if cfg.rollout.consistency == "exact":  # the decode pass ends each row where the sampler did
        fields["lengths"] = _abstract(lead, jnp.int32)
    if cfg.rollout.routing_replay:
        shape = (s.num_micro, mc.num_moe_layers, s.micro, s.prompt + s.response, mc.num_experts_per_tok)
        fields["forced_experts"] = _abstract(shape, jnp.int32)
    if prompt_sharing(cfg).pack:  # packed responses, at the worst case: no two responses share a row
        packed = (s.num_micro, packed_rows(s.micro, packed_rows_multiple(layout.row_ways, s.micro)))
        slots = lambda: _abstract(packed + (s.response,), jnp.int32)  # noqa: E731
        fields["packing"] = Packing(src=slots(), offset=slots(), segment=slots(), group=_abstract(packed, jnp.int32),
                                    back=_abstract(lead + (s.response,), jnp.int32))
    names = {f.name for f in dataclasses.fields(Experience)}
    micro = Experience(**{k: v for k, v in fields.items() if k in names})
    return jax.tree.map(lambda x, sh: _abstract(x.shape, x.dtype, sh), micro, micro_shardings(layout, micro))


def _update_program(cfg, mc, layout, model, graphdef, params, rest, opt_state, optimizer, s: StepShapes):
    """The trainer's jitted policy update (``trainer.update.build_update``) and its abstract arguments."""
    import jax
    import jax.numpy as jnp

    from jaxrl_llm.trainer.rl import make_sampler
    from jaxrl_llm.trainer.update import build_update

    # exact consistency's update runs a decode pass with the sampler's decode step
    sampler = make_sampler(cfg, model) if cfg.rollout.consistency == "exact" else None
    step = build_update(cfg, graphdef, optimizer, params, rest, opt_state, sampler=sampler)
    micro = _micro_batches(cfg, mc, layout, s)
    # the normaliser is reduced from the minibatch's (placed) mask: replicated on the mesh
    normalizer = _abstract((), jnp.float32, layout.replicated())
    control = {"entropy_coef": _abstract((), jnp.float32), "key": jax.eval_shape(lambda: jax.random.key(0))}
    return step, (params, rest, opt_state, micro, normalizer, control), {}


def plan_sampling_params(cfg, mc):
    """The trainer's sampling settings (``trainer.rollout.sampling_params``), with the checkpoint's tokenizer
    when ``model.path`` holds one, else stopping at the model config's end-of-text token."""
    from jaxrl_llm.sampling import SamplingParams
    from jaxrl_llm.trainer.rollout import sampling_params

    try:
        from jaxrl_llm.tokenizer import load_tokenizer

        return sampling_params(cfg, load_tokenizer(cfg.model.path))
    except (OSError, ValueError):
        eos = mc.eos_token_id if isinstance(mc.eos_token_id, tuple) else (mc.eos_token_id,)
        r = cfg.rollout
        return SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, min_p=r.min_p,
                              max_new_tokens=r.max_new_tokens, n=r.n,
                              stop_tokens=tuple(i for i in eos if isinstance(i, int)))


def _generate_program(cfg, mc, model, state, layout, s: StepShapes):
    """The sampler's jitted generate loop as the trainer's rollout worker calls it (prompts split over the
    data-parallel devices of ``layout``: the trainer's, or the sampler's own in disaggregated mode); returns
    ``(sampler, (function, args, kwargs))``."""
    import jax
    import jax.numpy as jnp

    from jaxrl_llm.trainer.rl import make_sampler

    sampler = make_sampler(cfg, model)
    b = cfg.train.prompts_per_step
    rows = layout.rows(b)
    args, kwargs = sampler._generate_args(state, _abstract((b, s.prompt), jnp.int32, rows),
                                          _abstract((b, s.prompt), jnp.bool_, rows), plan_sampling_params(cfg, mc),
                                          jax.eval_shape(lambda: jax.random.key(0)), None, None)
    return sampler, (sampler._generate, args, kwargs)


def _score_program(cfg, mc, graphdef, state, sampler, layout, s: StepShapes, rollout_sh, n: int):
    """The scoring pass of the trainer's scorer (``trainer.scoring.Scorer``) over ``n`` rollout rows placed as
    ``rollout_sh`` says: a micro-batch's forward."""
    import jax.numpy as jnp

    from jaxrl_llm.sampling import Rollout
    from jaxrl_llm.trainer.scoring import Scorer

    arr = lambda shape, dtype, name: _abstract(shape, dtype, getattr(rollout_sh, name))  # noqa: E731
    experts = None
    if mc.is_moe:
        experts = arr((mc.num_moe_layers, n, s.prompt + s.response, mc.num_experts_per_tok), jnp.int32, "experts")
    ro = Rollout(prompt_ids=arr((n, s.prompt), jnp.int32, "prompt_ids"),
                 prompt_mask=arr((n, s.prompt), jnp.bool_, "prompt_mask"),
                 tokens=arr((n, s.response), jnp.int32, "tokens"),
                 logprobs=arr((n, s.response), jnp.float32, "logprobs"),
                 mask=arr((n, s.response), jnp.bool_, "mask"), lengths=arr((n,), jnp.int32, "lengths"),
                 finish_reason=arr((n,), jnp.int32, "finish_reason"), experts=experts, n=cfg.rollout.n)
    scorer = Scorer(cfg, graphdef, sampler, layout)
    return scorer.old_logp_program(state, ro)


def _rollout_shardings(layout, rows: int, generated):
    """The placement of ``rows`` rollout rows when scoring: as the sampler returned them on the trainer's devices
    (``generated``), or placed over the trainer's row axes (a micro-batch, or rollouts from the sampler's own
    devices)."""
    if generated is not None:
        return generated
    placed = layout.rows(rows)
    fields = ("prompt_ids", "prompt_mask", "tokens", "logprobs", "mask", "lengths", "finish_reason", "experts")
    values = (placed,) * 7 + (layout.rows(rows, axis=1),)
    return dataclasses.make_dataclass("RolloutShardings", fields)(*values)


def _replicated_on(layout, tree):
    """``tree`` as abstract arrays replicated over ``layout`` (the sampler's copy of the weights)."""
    import jax

    return jax.tree.map(lambda x: _abstract(x.shape, x.dtype, layout.replicated()), tree)


def _lower(program, layout=None):
    """Lower ``(function, args, kwargs)``, traced under ``layout`` as the trainer traces it (or none)."""
    import contextlib

    fn, args, kwargs = program
    with layout.active() if layout is not None else contextlib.nullcontext():
        return fn.lower(*args, **kwargs)


PROGRAMS = ("update", "generate", "score")


def compile_plan(cfg, mc, sizes: dict[str, int], *, devices=None, cache: dict | None = None,
                 lowered: dict | None = None) -> MemoryPlan:
    """Lower and compile the update, generate and scoring programs on ``devices`` (default: the first local
    devices: the mesh's, then ``rollout.sampler_devices`` for a disaggregated sampler) and read XLA's memory
    analysis. Nothing is allocated.

    The programs are the trainer's own (the functions its components build, with the arguments they pass), on
    abstract arrays placed as the trainer places them. ``cache`` (a dict) memoises programs across calls whose
    settings are equal; ``lowered`` (a dict) receives each lowered program by name (``update``, ``generate``,
    ``score``).
    """
    start = time.perf_counter()
    programs = compile_programs(cfg, mc, sizes, devices=devices, cache=cache, lowered=lowered)
    (update, batch), generate, score = programs["update"], programs["generate"][0], programs["score"]
    p, o = programs["params"], programs["opt_state"]
    r, k, a = cfg.rollout, cfg.rollout.sampler_devices, cfg.algorithm
    plan_ = MemoryPlan(
        method="compiled", params=p, opt_state=o, ref_params=p if a.kl_coef > 0 else 0,
        critic=p + o if a.advantage == "gae" else 0,  # trunk + optimizer state (the value head is negligible)
        # async rollouts on the trainer's devices sample from a copy of the weights that outlives the update
        sampler_copy=p if r.async_rollout and not k else 0, disaggregated=bool(k),
        batch=batch, update_temp=update.temp, update_rest=update.peak - update.argument - update.temp,
        kv_cache=analytic_plan(cfg, mc, sizes).kv_cache, sample_temp=generate.temp,
        # the sampler's arguments hold the weights: resident already, unless they are a copy on its own devices
        sample_io=generate.peak - generate.temp - (0 if k else p),
        score_temp=score.temp, score_io=score.peak - score.temp - p,
        seconds=time.perf_counter() - start)
    if abs(update.argument - (p + o + batch + programs["rest"])) > 0.01 * update.argument:
        plan_.notes.append(f"update arguments: XLA counts {fmt_bytes(update.argument)}, the shardings give "
                           f"{fmt_bytes(p + o + batch)}")
    return plan_


def _named(program: str, compile_fn, *args):
    """``compile_fn(*args)`` (lowering or compiling); a failure names the program (a config the trainer cannot run
    fails here too)."""
    try:
        return compile_fn(*args)
    except PlanError:
        raise
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise PlanError(f"{program} does not compile: {type(err).__name__}: {first}") from err


def compile_programs(cfg, mc, sizes: dict[str, int], names=PROGRAMS, *, devices=None, cache: dict | None = None,
                     lowered: dict | None = None) -> dict:
    """The programs of :func:`compile_plan` named in ``names``, each compiled and analysed once: a dict with
    ``update`` (its :class:`ProgramMemory` and the bytes of one micro-batch), ``generate`` (its memory, the
    sampler, its output shardings), ``score`` (its memory), and the per-device bytes of ``params``,
    ``opt_state`` and ``rest`` (the model's other state). Scoring a whole step's rows on the trainer's devices
    reads the rollouts where the sampler left them, so it compiles the sampler too."""
    import jax
    from flax import nnx

    from jaxrl_llm.models.remat import resolve_remat
    from jaxrl_llm.parallel import Layout, make_mesh, merge_rules
    from jaxrl_llm.trainer.optim import run_optimizer

    unknown = set(names) - set(PROGRAMS)
    if unknown:
        raise ValueError(f"unknown programs {sorted(unknown)}; known: {', '.join(PROGRAMS)}")
    n, k = math.prod(sizes.values()), cfg.rollout.sampler_devices
    devices = list(jax.devices()[:n + k] if devices is None else devices)
    if len(devices) != n + k:
        raise PlanError(f"mesh {mesh_text(sizes)}{f' + {k} sampler devices' if k else ''} needs {n + k} devices, "
                        f"{len(devices)} are available here")
    cache = {} if cache is None else cache
    lowered = {} if lowered is None else lowered
    layout = Layout(make_mesh(sizes, devices[:n]), merge_rules(cfg.mesh.rules))
    sampler_layout = Layout(make_mesh({"data": -1}, devices[n:])) if k else None
    s = step_shapes(cfg, sizes)
    model, graphdef, params, rest = _abstract_policy(cfg, mc, layout)
    optimizer = run_optimizer(cfg)
    opt_state = _abstract_opt_state(optimizer, params, layout)
    state = nnx.merge_state(params, rest)
    sampler_state = _replicated_on(sampler_layout, state) if k else state
    m, r = cfg.model, cfg.rollout
    base = (mc, mesh_text(sizes), k, m.dtype, m.param_dtype, resolve_remat(m.remat, r.max_new_tokens), s.prompt,
            s.response, r.n, cfg.train.prompts_per_step, str(sorted(cfg.mesh.rules.items())))
    out = dict(params=_tree_bytes(params), opt_state=_tree_bytes(opt_state), rest=_tree_bytes(rest))
    if "update" in names:
        key = ("update", base, s.micro, s.num_micro, dataclasses.astuple(cfg.algorithm))
        if key not in cache:  # traced under the trainer's layout, as the trainer does (parallel.constrain_rows)
            program = _update_program(cfg, mc, layout, model, graphdef, params, rest, opt_state, optimizer, s)
            lowered["update"] = _named("the update", _lower, program, layout)
            micro = program[1][3]
            cache[key] = ProgramMemory.of(_named("the update", lowered["update"].compile)), _tree_bytes(micro)
        out["update"] = cache[key]
    score_rows = s.score_micro
    reads_sampler_output = score_rows == s.rows and not k
    if "generate" in names or ("score" in names and reads_sampler_output):
        key = ("generate", base, dataclasses.astuple(r))
        if key not in cache:
            with (sampler_layout or layout).active():  # its arguments made on the mesh, as the rollout worker does
                sampler, program = _generate_program(cfg, mc, model, sampler_state, sampler_layout or layout, s)
            lowered["generate"] = _named("the sampler", _lower, program, sampler_layout or layout)
            compiled = _named("the sampler", lowered["generate"].compile)
            cache[key] = ProgramMemory.of(compiled), sampler, compiled.output_shardings
        out["generate"] = cache[key]
    if "score" in names:
        key = ("score", base, dataclasses.astuple(r), cfg.train.logprob_chunk)
        if key not in cache:
            from jaxrl_llm.trainer.rl import make_sampler

            sampler = out["generate"][1] if "generate" in out else make_sampler(cfg, model)
            generated = out["generate"][2] if reads_sampler_output else None
            rollout_sh = _rollout_shardings(layout, score_rows, generated)
            program = _score_program(cfg, mc, graphdef, state, sampler, layout, s, rollout_sh, score_rows)
            lowered["score"] = _named("scoring", _lower, program, layout)
            cache[key] = ProgramMemory.of(_named("scoring", lowered["score"].compile))
        out["score"] = cache[key]
    return out
