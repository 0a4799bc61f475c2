"""The path layer on an in-memory filesystem (fsspec memory://) and file:// URIs, run files on URIs, checkpoints."""
import json
import os
import sys
import types

import fsspec
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import paths
from jaxrl_llm.checkpoint import Checkpointer, checkpoint_directory
from jaxrl_llm.tracking import MetricsLogger, read_jsonl, read_metrics


def _memory_root(name):
    root = f"memory://{name}"
    paths.rmtree(root)
    return root


def test_uri_operations_on_memory_and_file_uris(tmp_path):
    root = _memory_root("ops")
    assert paths.protocol(root) == "memory" and paths.local_path(root) is None
    assert paths.absolute("gs://b/x") == "gs://b/x" and paths.absolute("x") == os.path.abspath("x")
    assert paths.join("gs://b/run", "metrics.jsonl") == "gs://b/run/metrics.jsonl"
    assert paths.dirname("gs://b/run/x.json") == "gs://b/run" and paths.basename("gs://b/run/") == "run"
    paths.write_text(paths.join(root, "d", "a.txt"), "hello\n")
    paths.write_bytes(paths.join(root, "d", "b.bin"), b"\x00\x01")
    assert paths.read_text(paths.join(root, "d", "a.txt")) == "hello\n"
    assert paths.listdir(paths.join(root, "d")) == ["a.txt", "b.bin"]
    assert paths.glob(paths.join(root, "d", "*.txt")) == [paths.join(root, "d", "a.txt")]
    assert paths.isdir(paths.join(root, "d")) and paths.isfile(paths.join(root, "d", "b.bin"))
    assert paths.size(paths.join(root, "d", "b.bin")) == 2
    # file:// URIs name local files
    uri = f"file://{tmp_path}/f.txt"
    paths.write_text(uri, "x")
    assert (tmp_path / "f.txt").read_text() == "x" and paths.local_path(uri) == str(tmp_path / "f.txt")
    if _no("gcsfs"):  # a missing backend names the extra that installs it
        with pytest.raises(ImportError, match=r"jaxrl_llm\[gcs\]"):
            paths.exists("gs://bucket/x")


def _no(module):
    import importlib.util

    return importlib.util.find_spec(module) is None


def test_local_copy_mirrors_a_uri_directory_once(tmp_path):
    root = _memory_root("model")
    for name, data in (("config.json", b"{}"), ("model.safetensors", b"0123456789")):
        paths.write_bytes(paths.join(root, name), data)
    local = paths.local_copy(root, cache=str(tmp_path / "cache"))
    assert sorted(os.listdir(local)) == ["config.json", "model.safetensors"]
    assert open(os.path.join(local, "model.safetensors"), "rb").read() == b"0123456789"
    mtime = os.path.getmtime(os.path.join(local, "model.safetensors"))
    assert paths.local_copy(root, cache=str(tmp_path / "cache")) == local  # same files: nothing copied again
    assert os.path.getmtime(os.path.join(local, "model.safetensors")) == mtime
    paths.write_bytes(paths.join(root, "model.safetensors"), b"changed!")  # another size: copied again
    assert open(os.path.join(paths.local_copy(root, cache=str(tmp_path / "cache")), "model.safetensors"),
                "rb").read() == b"changed!"
    assert paths.local_copy(str(tmp_path)) == str(tmp_path)  # local paths are used where they are
    with paths.staged_output(paths.join(root, "out")) as stage:
        os.makedirs(os.path.join(stage, "sub"))
        open(os.path.join(stage, "sub", "f.txt"), "w").write("y")
    assert paths.read_text(paths.join(root, "out", "sub", "f.txt")) == "y"


def test_metrics_logger_on_a_uri_rewrites_and_resumes():
    root = _memory_root("run")
    logger = MetricsLogger(root, tensorboard=True, flush_seconds=0.0)
    logger.log(1, {"reward": 0.5})
    logger.log(2, {"reward": 0.75, "kl": float("inf")})
    assert [r["step"] for r in read_jsonl(paths.join(root, "metrics.jsonl"))] == [1, 2]  # flushed as it goes
    logger.close()
    events = paths.listdir(paths.join(root, "tensorboard"))
    assert len(events) == 1 and events[0].startswith("events.out.tfevents")
    assert paths.size(paths.join(root, "tensorboard", events[0])) > 0
    # a resumed run keeps the rows already written (an object store cannot append) and repeats step 2
    logger = MetricsLogger(root, tensorboard=False, flush_seconds=3600.0)
    logger.log(2, {"reward": 0.8})
    logger.log(3, {"reward": 1.0})
    assert len(read_jsonl(paths.join(root, "metrics.jsonl"))) == 2  # not flushed yet
    logger.close()
    rows = read_jsonl(paths.join(root, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 2, 3] and rows[1]["kl"] == "inf"
    assert [(r["step"], r["reward"]) for r in read_metrics(paths.join(root, "metrics.jsonl"))] == \
        [(1, 0.5), (2, 0.8), (3, 1.0)]


def test_wandb_logger_with_a_fake_module(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, metrics, step):
            calls.append(("log", step, metrics))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    fake = types.SimpleNamespace(init=init, util=types.SimpleNamespace(generate_id=lambda: "abc123"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = MetricsLogger(str(tmp_path), tensorboard=False, wandb=True, wandb_project="proj",
                           wandb_config={"train": {"steps": 3}})
    logger.log(1, {"reward": 0.5, "eval/pass@1": 0.25})
    logger.close()
    assert calls[0][0] == "init"
    kw = calls[0][1]
    assert (kw["project"], kw["id"], kw["resume"], kw["config"]) == ("proj", "abc123", "allow", {"train": {"steps": 3}})
    assert calls[1] == ("log", 1, {"reward": 0.5, "eval/pass@1": 0.25}) and calls[2] == ("finish",)
    # a resumed run continues the same W&B run
    fake.util.generate_id = lambda: "other"
    MetricsLogger(str(tmp_path), tensorboard=False, wandb=True, wandb_project="proj").close()
    assert calls[3][1]["id"] == "abc123"
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ImportError, match=r"jaxrl_llm\[wandb\]"):
        MetricsLogger(str(tmp_path / "x"), tensorboard=False, wandb=True)


def test_checkpoint_directories_orbax_can_write(tmp_path):
    assert checkpoint_directory(f"file://{tmp_path}/ck") == f"{tmp_path}/ck"
    assert checkpoint_directory("gs://bucket/run/checkpoints/") == "gs://bucket/run/checkpoints"
    assert checkpoint_directory("rel") == os.path.abspath("rel")
    for uri in ("memory://run/checkpoints", "s3://bucket/checkpoints"):
        with pytest.raises(ValueError, match="checkpoint.dir: orbax writes checkpoints to local paths and gs://"):
            Checkpointer(uri)
    # through a file:// URI: orbax writes the local directory it names
    with Checkpointer(f"file://{tmp_path}/ck", keep=2, async_save=False) as ckpt:
        ckpt.save(3, {"w": jnp.arange(4.0)}, {"data": {"batches": 3}})
        restored, meta = ckpt.restore({"w": jnp.zeros(4)})
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4.0))
    assert meta == {"data": {"batches": 3}} and os.path.isdir(tmp_path / "ck" / "3")


def test_best_checkpoint_is_kept_beside_the_newest(tmp_path):
    values = {1: 0.2, 2: None, 3: 0.9, 4: None, 5: 0.5, 6: None, 7: None}
    with Checkpointer(tmp_path, keep=2, async_save=False, best_metric="eval/pass@1") as ckpt:
        for step, v in values.items():
            ckpt.save(step, {"w": jnp.full(2, float(step))}, {},
                      metrics=None if v is None else {"eval/pass@1": v, "eval/reward_mean": 0.0})
        assert ckpt.all_steps() == [3, 6, 7] and ckpt.best_step() == 3 and ckpt.latest_step() == 7
        with pytest.raises(KeyError, match="checkpoint.best_metric='eval/pass@1' is not among"):
            ckpt.save(8, {"w": jnp.zeros(2)}, {}, metrics={"eval/other": 1.0})
    with Checkpointer(tmp_path, keep=2, best_metric="eval/pass@1") as again:  # the ranking survives a restart
        assert again.best_step() == 3
        restored, _ = again.restore({"w": jnp.zeros(2)}, step=again.best_step())
    np.testing.assert_array_equal(np.asarray(restored["w"]), [3.0, 3.0])
    with Checkpointer(tmp_path / "min", keep=1, async_save=False, best_metric="eval/loss", best_mode="min") as ckpt:
        for step, v in ((1, 0.5), (2, 0.1), (3, 0.7)):
            ckpt.save(step, {"w": jnp.zeros(1)}, {}, metrics={"eval/loss": v})
        assert ckpt.all_steps() == [2, 3] and ckpt.best_step() == 2


def test_fsspec_memory_is_what_the_tests_use():
    # the memory filesystem is one per process: what the layer writes, fsspec itself reads
    root = _memory_root("check")
    paths.write_text(paths.join(root, "x.json"), json.dumps({"a": 1}))
    with fsspec.open(paths.join(root, "x.json"), "r") as f:
        assert json.load(f) == {"a": 1}
