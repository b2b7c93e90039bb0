"""The Run object: one resolution of the data, the splits and the runtime, and stage calls that give exactly the
numbers of the pipeline (which is built on it)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_config

import v3kit.run as run_module
from v3kit.pipeline import run_pipeline, stage_table
from v3kit.run import Run


def test_stage_by_stage_equals_the_pipeline_bit_for_bit(tmp_path):
    piped = run_pipeline(tiny_config(tmp_path / "piped"))
    run = Run(tiny_config(tmp_path / "staged"))
    run.sft()
    stage1 = run.stage1()
    rce = run.rce(stage1)
    after_rce = copy.deepcopy(stage1.policy)
    grpo = run.grpo(stage1)
    models = {"sft": stage1.reference, "rce": after_rce, "grpo": stage1.policy}
    selection, models["selected"] = run.select(models)
    table = stage_table(models, run.splits.test, stage1.reference, stage1.model_config.sim_temperature)
    assert table.equals(piped.table)  # every number, bit for bit
    assert rce.history.equals(piped.rce.history) and grpo.history.equals(piped.grpo.history)
    assert selection.stage == piped.selection.stage and selection.epoch == piped.selection.epoch


def test_the_data_and_runtime_are_resolved_once(tmp_path, monkeypatch):
    calls = []
    real = run_module.prepare_data

    def counting(cfg, expect_dims=None):
        calls.append(cfg.run_dir)
        return real(cfg, expect_dims=expect_dims)

    monkeypatch.setattr(run_module, "prepare_data", counting)
    run = Run(tiny_config(tmp_path / "r", "grpo.epochs=1", "rce.epochs=1"))
    run.sft()
    stage1 = run.stage1()
    run.rce(stage1)
    run.grpo(stage1)
    assert len(calls) == 1
    assert run.runtime.device == torch.device("cpu")


def test_grpo_overrides_are_validated_like_the_config(tmp_path):
    run = Run(tiny_config(tmp_path / "r", "grpo.epochs=1", "rce.epochs=0"))
    run.sft()
    stage1 = run.stage1()
    with pytest.raises(ValueError, match="grpo.kl_beta must be >= 0"):
        run.grpo(stage1, kl_beta=-1.0)
    fixed = run.grpo(stage1, policy=copy.deepcopy(stage1.policy), kl_beta=0.0, context={"run_dir": None})
    assert fixed.history["stage"].eq("grpo").all() and not (tmp_path / "r" / "grpo_epoch1.pt").exists()
