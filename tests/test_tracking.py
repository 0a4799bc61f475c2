import math
import os

from jaxrl_llm.tracking import MetricsLogger, Progress, read_jsonl


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
