"""torchrun: 2 CPU ranks (gloo) train what one process trains, for SFT, RCE and GRPO, and a run resumes under
another world size.

Why weights are compared at 5e-5 and not bit for bit: the ranks' gradients are summed in another order than one
backward pass sums the same rows (differences ~1e-7 relative), and Adam scales every coordinate's step to about
``lr``, so a coordinate whose true gradient is ~0 can step the other way; at lr 1e-5 over ~20 steps that bounds the
difference by a few lr. The logged losses, the held-out metrics and the stage table agree to 1e-5.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

TINY = ["progress=false", "data.synthetic.n_queries=240", "sft.epochs=3", "rce.epochs=2", "grpo.epochs=3",
        "grpo.samples=sampled", "grpo.adv_scale=batch"]

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun")
                                .exists(), reason="torchrun is not installed")


def _run(run_dir: Path, ranks: int, *extra: str, sft: Path | None = None) -> None:
    sets = [a for s in [*TINY, f"run_dir={run_dir}", *extra] for a in ("--set", s)]
    sets += ["--sft", str(sft)] if sft else []
    if ranks == 1:
        cmd = [sys.executable, "-m", "v3kit", "run", *sets]
    else:
        torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
        cmd = [torchrun, "--standalone", f"--nproc_per_node={ranks}", "-m", "v3kit", "run", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]


def _numbers(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path)
    return frame.select_dtypes("number")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.slow
def test_two_ranks_train_what_one_process_trains(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run(one, 1)
    _run(two, 2)
    # SFT (lr 1e-3), RCE and GRPO with sampled draws and a batch-wide advantage scale: every logged value.
    a, b = _numbers(one / "metrics.csv"), _numbers(two / "metrics.csv")
    assert a.shape == b.shape and list(a.columns) == list(b.columns)
    assert float((a - b).abs().max().max()) < 1e-5
    assert float((_numbers(one / "summary.csv") - _numbers(two / "summary.csv")).abs().max().max()) < 1e-5
    # Only rank 0 wrote: one metrics.csv row per step, as one process writes.
    assert len(pd.read_csv(two / "metrics.csv")) == len(pd.read_csv(one / "metrics.csv"))

    # RCE and GRPO from the same SFT checkpoint at the seed's lr: the weights themselves.
    a1, b2 = tmp_path / "a1", tmp_path / "b2"
    _run(a1, 1, "rce.lr=1e-5", "grpo.lr=1e-5", sft=one / "sft.pt")
    _run(b2, 2, "rce.lr=1e-5", "grpo.lr=1e-5", sft=one / "sft.pt")
    for name in ("rce_epoch2.pt", "grpo_epoch3.pt"):
        wa, wb = _weights(a1 / name), _weights(b2 / name)
        assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 5e-5, name


@pytest.mark.slow
def test_a_run_resumes_under_another_world_size(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    _run(whole, 1)
    _run(split, 2, "grpo.epochs=2")  # two ranks stop after GRPO epoch 2 ...
    out = subprocess.run([sys.executable, "-m", "v3kit", "run", "--resume",
                          *[a for s in [*TINY, f"run_dir={split}"] for a in ("--set", s)]],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]  # ... and one process finishes epoch 3
    a, b = _numbers(whole / "metrics.csv"), _numbers(split / "metrics.csv")
    assert a.shape == b.shape and float((a - b).abs().max().max()) < 1e-5
