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


def test_stacked_step_rows_time_each_way_of_stepping():
    """``benchmarks/stacked.py --user-model``'s step rows: one row per way of stepping 2 members, each a positive
    time in ms and its ratio to one after another (its own row says 1.00x)."""
    spec = importlib.util.spec_from_file_location("v3kit_bench_stacked", ROOT / "benchmarks" / "stacked.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = []
    mod.bench_steps(lambda *row: rows.append(row), k=2, rounds=1, steps=10)
    assert [r[1] for r in rows] == list(mod._step_fns(2))
    assert all(r[2] > 0 and r[3] == "ms" for r in rows)
    assert rows[-1][5].startswith("1.00x one after another")
