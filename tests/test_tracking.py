import math
import os

from jaxrl_llm.tracking import MetricsLogger, Progress, drop_after, read_jsonl


def test_jsonl_and_tensorboard(tmp_path):
    logger = MetricsLogger(str(tmp_path))
    logger.log(1, {"reward": 0.5, "kl": float("nan")})
    logger.log(2, {"reward": 0.75})
    logger.close()
    rows = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["reward"] == 0.5 and rows[1]["reward"] == 0.75
    assert rows[0]["kl"] == "nan"
    events = os.listdir(os.path.join(tmp_path, "tensorboard"))
    assert any(name.startswith("events.out.tfevents") for name in events)


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(str(tmp_path / "run"), enabled=False)
    logger.log(1, {"reward": 1.0})
    logger.close()
    assert not os.path.exists(tmp_path / "run")
    with Progress(3, "x", enabled=False) as bar:
        bar.update(reward=math.pi)


def test_a_resumed_logger_drops_the_rows_after_the_restored_step(tmp_path):
    logger = MetricsLogger(str(tmp_path), tensorboard=False)
    for step in (1, 2, 3):
        logger.log(step, {"reward": float(step)})
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "rew')  # a write cut by a kill
    logger = MetricsLogger(str(tmp_path), tensorboard=False, keep_through=2)  # resumed from step 2
    logger.log(3, {"reward": 30.0})
    logger.close()
    rows = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    assert [(r["step"], r["reward"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    MetricsLogger(str(tmp_path), tensorboard=False, keep_through=0).close()
    assert read_jsonl(os.path.join(tmp_path, "metrics.jsonl")) == []
    assert drop_after(['{"step": 1}\n', '{"step": 2}', '{"st'], 1) == ['{"step": 1}\n']
