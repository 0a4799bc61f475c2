"""Where the update's log-probs and the sampler's part (float32, tiny Qwen3, one device): hidden states of one
decode step per token against one forward over the response (the update's shared-prompt path), and the
sampler's log-softmax against the chunked log-prob kernel on the same logits; and exact mode's teacher-forced decode
loop under ``jax.grad``, differentiated directly and through ``sampling.decode_logprobs``. Findings:
docs/features.md.

    python experiments/exact_probe.py
"""
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx  # noqa: E402
from jaxrl_llm.models import Decoder, ModelConfig, init_cache, left_pad_positions  # noqa: E402
from jaxrl_llm.sampling import Sampler, SamplingParams  # noqa: E402
from jaxrl_llm.sampling.decode import token_logprob  # noqa: E402
from jaxrl_llm.sampling.score import _prefill_groups  # noqa: E402
from jaxrl_llm.losses import token_logprobs_and_entropy  # noqa: E402

def cfg(moe):
    extra = dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32) if moe else dict(model_type="qwen3")
    return ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=8, qk_norm=True, max_position_embeddings=512, **extra)

def run(moe, dtype, kernel, n=4, new=12):
    model = Decoder(cfg(moe), rngs=nnx.Rngs(0), attention=kernel, dtype=dtype)
    model.embed[...] = model.embed[...] * 5.0
    graphdef, state = nnx.split(model)
    ids = jnp.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5], [0, 9, 8, 7, 6]], jnp.int32)
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], bool)
    ro = Sampler(model, consistency="exact").generate(state, ids, mask, SamplingParams(max_new_tokens=new, n=n), jax.random.key(1))
    p = ids.shape[1]
    plen = jnp.repeat(mask.sum(1), n)

    @jax.jit
    def sampler_side(state, tokens):
        m = nnx.merge(graphdef, state)
        b = ids.shape[0]
        cache = init_cache(m.cfg, b, p, m.dtype)  # as the sampler's prefill: the prompts' slots, then the rest
        out = m(ids, left_pad_positions(mask), attention_mask=mask, cache=cache)
        h0 = jnp.repeat(out.hidden[:, -1], n, axis=0)
        cache = out.cache.map_batch(functools.partial(jnp.repeat, repeats=n, axis=0)).with_slots(p + new)
        hs = [h0]
        for t in range(new - 1):
            o = m(tokens[:, t:t+1], (plen + t)[:, None], cache=cache)
            cache = o.cache
            hs.append(o.hidden[:, 0])
        h = jnp.stack(hs, 1)
        logits = m.logits(h)
        lp = jax.vmap(lambda lg, tk: token_logprob(lg, tk, 1.0), in_axes=(1, 1), out_axes=1)(logits, tokens)
        return h, lp

    @jax.jit
    def train_side(state, tokens):
        m = nnx.merge(graphdef, state)
        r = tokens.shape[1]
        out, prompt_len = _prefill_groups(m, ro.prompt_ids, ro.prompt_mask, None, n, r)
        rep = functools.partial(jnp.repeat, repeats=n, axis=0)
        positions = rep(prompt_len)[:, None] + jnp.arange(r, dtype=jnp.int32)[None, :]
        resp = m(tokens, positions, attention_mask=ro.mask, cache=out.cache.map_batch(rep).with_slots(p + r))
        h = jnp.concatenate([rep(out.hidden[:, -1:]), resp.hidden[:, :-1]], axis=1)
        lp, _ = token_logprobs_and_entropy(h, m.unembedding(), tokens, chunk=512)
        return h, lp

    hs, lps = sampler_side(state, ro.tokens)
    ht, lpt = train_side(state, ro.tokens)
    mk = np.asarray(ro.mask)
    dh = np.abs(np.asarray(hs, np.float32) - np.asarray(ht, np.float32)).max(-1)
    print("hidden diff max (valid)", np.where(mk, dh, 0).max(), "per pos", np.where(mk, dh, 0).max(0))
    print("sampler-lp vs ro.logprobs", np.abs(np.where(mk, np.asarray(lps) - np.asarray(ro.logprobs), 0)).max())
    print("train-lp vs ro.logprobs", np.abs(np.where(mk, np.asarray(lpt) - np.asarray(ro.logprobs), 0)).max())
    # logits function alone on the same hidden
    m = nnx.merge(graphdef, state)
    lp2, _ = jax.jit(lambda h, t: token_logprobs_and_entropy(h, m.unembedding(), t, chunk=512))(hs, ro.tokens)
    print("chunked-logprob on sampler hidden vs sampler lp", np.abs(np.where(mk, np.asarray(lp2) - np.asarray(lps), 0)).max())


def logits_probe():
    model = Decoder(cfg(False), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(16, 12, 32)), jnp.float32)
    tok = jnp.asarray(rng.integers(0, 64, (16, 12)), jnp.int32)
    w = model.unembedding()
    z_model = jax.jit(lambda h: model.logits(h))(h)
    z_chunk = jax.jit(lambda h: jnp.einsum("bcd,dv->bcv", h, w, preferred_element_type=jnp.float32))(h)
    z_row = jax.jit(lambda h: jax.vmap(lambda x: model.logits(x[:, None])[:, 0], in_axes=1, out_axes=1)(h))(h)
    print("logits: model.logits vs chunk einsum", float(jnp.abs(z_model - z_chunk).max()), " vs per-step rows", float(jnp.abs(z_model - z_row).max()))
    a = jax.jit(lambda z: jax.vmap(lambda lg, t: token_logprob(lg, t, 1.0), in_axes=(1, 1), out_axes=1)(z, tok))(z_model)
    def stats(z):
        top = jnp.max(z, axis=-1)
        zs = z - top[..., None]
        lse_s = jnp.log(jnp.sum(jnp.exp(zs), axis=-1))
        return jnp.take_along_axis(zs, tok[..., None], axis=-1)[..., 0] - lse_s
    b = jax.jit(stats)(z_model)
    print("log-softmax: sampler formula vs chunked formula, same logits", float(jnp.abs(a - b).max()))


def grad_probe(moe=False, new=10):
    """Forward log-probs inside a gradient program against the sampler's: the teacher-forced decode loop
    differentiated directly, and through decode_logprobs (the plain loop's values with the full-sequence forward's
    gradient)."""
    from jaxrl_llm.compile_options import compiler_options
    from jaxrl_llm.sampling import decode_logprobs
    from jaxrl_llm.sampling.sampler import scanned_decode_logprobs

    model = Decoder(cfg(moe), rngs=nnx.Rngs(0))
    model.embed[...] = model.embed[...] * 20.0
    graphdef, state = nnx.split(model)
    sampler = Sampler(model, consistency="exact")
    ids = jnp.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5], [0, 9, 8, 7, 6]], jnp.int32)
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], bool)
    ro = sampler.generate(state, ids, mask, SamplingParams(temperature=0.8, max_new_tokens=new, n=2),
                          jax.random.key(1))
    kw = dict(n=2, temperature=0.8, cache_dtype=sampler.cache_dtype, compute_dtype=None)
    args = (ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask, ro.lengths)

    def scan_loop(st):  # the decode steps as a scan over the response, which reverse mode can differentiate
        return scanned_decode_logprobs(sampler.graphdef, st, *args[:4], n=2, temperature=0.8,
                                       cache_dtype=sampler.cache_dtype)

    ways = {"differentiated directly": scan_loop,
            "decode_logprobs": lambda st: decode_logprobs(sampler.graphdef, st, *args, **kw)}
    mk = np.asarray(ro.mask)
    for name, fn in ways.items():
        def loss(st, fn=fn):
            logp, ent = fn(st)
            return jnp.sum(0.3 * logp) + jnp.sum(0.1 * ent), logp
        (_, logp), _ = jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=compiler_options())(state)
        diff = np.abs(np.asarray(logp) - np.asarray(ro.logprobs))[mk]
        print(f"{'moe' if moe else 'dense'} under jax.grad, {name}: {int((diff > 0).sum())} of {diff.size} "
              f"tokens differ from the sampler's, by at most {diff.max():.2g}")


if __name__ == "__main__":
    run(False, jnp.float32, "auto")
    logits_probe()
    grad_probe(False)
    grad_probe(True)
