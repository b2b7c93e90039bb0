"""The benchmark's own bookkeeping (its numbers are only as good as these)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("v3kit_bench", ROOT / "benchmarks" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_model_flops_by_hand():
    bench = load_bench()
    flops, shapes = bench.model_flops("tiny")  # B=32, G=8, 16-d, towers 16 -> 64 -> 32
    fwd = 2 * 32 * (16 * 64 + 64 * 32) + 2 * 32 * 8 * (16 * 64 + 64 * 32)
    assert flops == 3 * fwd
    assert shapes == [(32, 16, 64), (32, 64, 32), (256, 16, 64), (256, 64, 32)]


def test_step_timer_skips_epoch_boundaries(monkeypatch):
    bench = load_bench()
    clock = iter([0.0, 1.0, 3.0, 10.0, 11.0])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    timer = bench.StepTimer()
    for epoch in (1, 1, 1, 2, 2):
        timer.on_step({"epoch": epoch})
    assert timer.steps == [1.0, 2.0, 1.0]  # 3.0 -> 10.0 spans the evaluation between epochs
