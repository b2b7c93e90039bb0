"""The rows an epoch checkpoint stores (``MetricsLog.packed_stage_rows``): one JSON text that gives every logged
value back exactly, and a resume rebuilds ``metrics.csv`` from it, or from the list of dicts older checkpoints hold,
to the same bytes."""

from __future__ import annotations

import json
import math

from v3kit.train.metrics_log import MetricsLog

ROWS = [
    {"stage": "grpo", "split": "val", "epoch": 0, "step": 0, "acc@1": 0.1 + 0.2, "kl": math.nan},
    {"stage": "grpo", "split": "train", "epoch": 1, "step": 1, "loss": -1e-300, "grad_norm": math.inf, "flag": True},
    {"stage": "grpo", "split": "train", "epoch": 1, "step": 2, "loss": 5e-324, "note": 'a "quoted", comma', "x": None},
]


def _logged(tmp_path, name: str) -> MetricsLog:
    log = MetricsLog(tmp_path / name)
    (tmp_path / name).mkdir()
    log.start_stage("sft", [{"stage": "sft", "split": "val", "epoch": 0, "step": 0, "acc@1": 0.5}])
    log.start_stage("grpo", [])
    for row in ROWS:
        log.add(dict(row))
    return log


def _same(a: object, b: object) -> bool:
    return type(a) is type(b) and (a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)))


def test_packed_rows_give_every_value_back_with_its_type(tmp_path):
    log = _logged(tmp_path, "run")
    packed = log.packed_stage_rows("grpo")
    assert isinstance(packed, str)
    fresh = MetricsLog(tmp_path / "run")
    fresh.start_stage("grpo", packed, 1)
    back = fresh.stage_rows("grpo")
    assert [list(r) for r in back] == [list(r) for r in ROWS]  # the same keys in the same order
    for got, want in zip(back, ROWS):
        assert all(_same(got[k], want[k]) for k in want), (got, want)


def test_a_resume_from_packed_rows_or_from_a_list_writes_the_same_file(tmp_path):
    log = _logged(tmp_path, "run")
    text = (tmp_path / "run" / "metrics.csv").read_bytes()
    for form in (log.packed_stage_rows("grpo"), log.stage_rows("grpo")):  # new checkpoints, older checkpoints
        again = MetricsLog(tmp_path / "run")
        again.start_stage("grpo", form, 1)
        again.close()
        assert (tmp_path / "run" / "metrics.csv").read_bytes() == text


def test_rows_holding_other_values_stay_a_list():
    log = MetricsLog(None)
    log.add(
        {"stage": "rce", "split": "train", "epoch": 1, "step": 1, "shape": (2, 3)}
    )  # a tuple would come back a list
    assert log.packed_stage_rows("rce") == log.stage_rows("rce")


def test_packed_rows_follow_rows_added_after_a_pack_and_a_restart_of_the_stage(tmp_path):
    log = _logged(tmp_path, "run")
    log.packed_stage_rows("grpo")  # encodes the rows so far once
    log.add({"stage": "grpo", "split": "train", "epoch": 2, "step": 3, "loss": 0.25})
    assert log.packed_stage_rows("grpo") == json.dumps(log.stage_rows("grpo"))
    log.start_stage("grpo", [{"stage": "grpo", "split": "val", "epoch": 0, "step": 0, "acc@1": 0.75}])
    assert json.loads(log.packed_stage_rows("grpo")) == log.stage_rows("grpo")
