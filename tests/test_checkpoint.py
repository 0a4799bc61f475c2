"""Checkpoint save/restore: exact values, shardings, keep-N, and a save killed half-way."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrl_llm.checkpoint import Checkpointer


def _state(seed):
    k = jax.random.key(seed)
    return {
        "params": {"w": jax.random.normal(k, (16, 8)), "b": jnp.arange(8, dtype=jnp.float32)},
        "step": jnp.asarray(seed, jnp.int32),
        "rng": jax.random.key_data(k),
    }


def test_roundtrip_exact_and_meta(tmp_path):
    state = _state(3)
    with Checkpointer(tmp_path, keep=2) as ckpt:
        ckpt.save(5, state, {"data": {"next_index": 17}, "note": "x"})
        ckpt.wait()
        restored, meta = ckpt.restore(jax.tree.map(jnp.zeros_like, state))
    assert meta == {"data": {"next_index": 17}, "note": "x"}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_keep_n_and_latest(tmp_path):
    with Checkpointer(tmp_path, keep=2) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, _state(step), {})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3]
        assert ckpt.latest_step() == 3
        restored, _ = ckpt.restore(_state(0), step=2)
    assert int(restored["step"]) == 2


def test_restore_into_sharding(tmp_path):
    devices = np.array(jax.devices()[:8]).reshape(4, 2)
    mesh = Mesh(devices, ("data", "tensor"))
    state = _state(1)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
        ckpt.wait()
        sharding = NamedSharding(mesh, P("data", "tensor"))
        target = dict(state)
        target["params"] = dict(state["params"])
        target["params"]["w"] = jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=sharding)
        restored, _ = ckpt.restore(target)
    assert restored["params"]["w"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.asarray(state["params"]["w"]))


def test_missing_checkpoint_is_an_error(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
            ckpt.restore(_state(0))


def test_killed_during_save_resumes_from_last_complete(tmp_path):
    """A process saves step 1 completely, starts an async save of step 2 and dies without waiting."""
    script = textwrap.dedent(
        f"""
        import os, jax, jax.numpy as jnp
        from jaxrl_llm.checkpoint import Checkpointer
        ckpt = Checkpointer({str(tmp_path)!r}, keep=5, async_save=True)
        ckpt.save(1, {{"w": jnp.ones((4,)), "step": jnp.asarray(1)}}, {{"step": 1}})
        ckpt.wait()
        big = {{"w": jnp.ones((4,)) * 2, "step": jnp.asarray(2), "pad": jnp.zeros((64, 1024, 1024))}}
        ckpt.save(2, big, {{"step": 2}})
        # die while the background thread is still writing: once its temporary step-2 directory exists (on a
        # loaded machine the thread may not have started when save() returns)
        import time
        deadline = time.monotonic() + 60
        while not any(n.startswith("2.") for n in os.listdir({str(tmp_path)!r})) and time.monotonic() < deadline:
            time.sleep(0.001)
        os._exit(0)
        """
    )
    env = dict(os.environ)
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    # the interrupted save left an incomplete step-2 directory behind
    assert any(name.startswith("2.") for name in os.listdir(tmp_path)), os.listdir(tmp_path)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
        restored, meta = ckpt.restore({"w": jnp.zeros((4,)), "step": jnp.asarray(0)})
    assert meta == {"step": 1}
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.ones(4))
