"""The peer libraries of the benchmarks (transformers, TRL), each run in a process of its own.

A peer and jaxrl_llm take turns on the same cores, but not in one process, so that neither library's runtime state
(thread pools, allocator) weighs on the other's timings: after torch's ``generate`` had run in a process, the JAX
programs of that process were often slower (rollout plus scoring 0.61-0.93 s against 0.45-0.49 s before it, in 4
of 5 runs; in 4 runs without torch, never).

The child process is started with ``spawn`` (a fresh interpreter: nothing of the parent's JAX runtime) and answers
requests over a pipe; the parent times each request from sending it to the answer.
"""
from __future__ import annotations

import multiprocessing


class Peer:
    """A worker function ``target(conn, *args)`` in a child process, driven over a pipe."""

    def __init__(self, target, *args):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=target, args=(child, *args), daemon=True)
        self.process.start()
        child.close()

    def recv(self):
        """The next message of the child; its exception, re-raised, when it failed."""
        try:
            kind, value = self.conn.recv()
        except EOFError:
            code = self.process.exitcode
            raise RuntimeError(f"the peer process ended without an answer (exit code {code})") from None
        if kind == "error":
            raise RuntimeError(f"peer process failed:\n{value}")
        return value

    def call(self, *request):
        self.conn.send(request)
        return self.recv()

    def close(self) -> None:
        try:
            self.conn.send(("stop",))
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()


def _report_error(conn) -> None:
    """Send the exception being handled to the parent, which raises it."""
    import traceback
    conn.send(("error", traceback.format_exc()))


def _serve(conn, handlers: dict) -> None:
    """Answer ``(name, *args)`` requests with ``handlers[name](*args)`` until ``("stop",)``."""
    while True:
        request = conn.recv()
        if request[0] == "stop":
            return
        try:
            conn.send(("ok", handlers[request[0]](*request[1:])))
        except Exception:  # noqa: BLE001 - reported to the parent, which raises it
            _report_error(conn)
            return


def hf_generate_worker(conn, model_dir: str, ids, mask, new_tokens: int) -> None:
    """transformers' ``generate`` on the tiny Qwen3 of the sampler benchmark: builds the model (seed 0), saves it to
    ``model_dir`` and answers with torch's thread count, then runs one ``generate`` per ``("generate",)`` request."""
    try:
        import torch
        import transformers

        cfg = transformers.Qwen3Config(vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=64, intermediate_size=768,
                                       max_position_embeddings=512, tie_word_embeddings=False)
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        hf.save_pretrained(model_dir)
        input_ids, attention_mask = torch.tensor(ids), torch.tensor(mask)
    except Exception:  # noqa: BLE001
        _report_error(conn)
        return

    def generate():
        with torch.no_grad():
            out = hf.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0,
                              top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              pad_token_id=0)
        assert out.shape[1] == input_ids.shape[1] + new_tokens
        return None

    conn.send(("ok", torch.get_num_threads()))
    _serve(conn, {"generate": generate})


def trl_worker(conn, model_dir: str, out_dir: str, steps: int) -> None:
    """TRL's GRPOTrainer on the GRPO benchmark's batch (see ``grpo_step.time_trl``). After each of its steps it
    sends ``("ok", ("step", seconds))`` and waits for ``("continue",)``, so the parent can run a step of its own in
    between; at the end it sends ``("ok", ("done", seconds of every step))``."""
    try:
        from grpo_step import time_trl

        def after_step(seconds: float):
            conn.send(("ok", ("step", seconds)))
            kind, *_ = conn.recv()
            if kind != "continue":
                raise RuntimeError(f"unexpected request {kind!r}")

        times = time_trl(model_dir, out_dir, steps, after_step=after_step)
        conn.send(("ok", ("done", times)))
    except Exception:  # noqa: BLE001
        _report_error(conn)
