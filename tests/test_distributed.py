"""torchrun: 2 CPU ranks (gloo) train what one process trains, for SFT, RCE and GRPO, and a run resumes under
another world size.

Weights are compared at 1e-5 in every direction the loss can see. One direction it cannot: the candidate tower's
output bias ``b`` adds ``<q, b>`` to every candidate of a group, and a group softmax ignores a shift shared by the
whole group, so that bias's gradient is zero in exact arithmetic (checked below in float64). In float32 it is
rounding noise, which one backward pass and the ranks' all-reduce sum in different orders, and Adam scales any
nonzero gradient to a step of about ``lr``: that bias random-walks differently in the two runs (measured ~1e-5 at lr
1e-5) while every other weight agrees to ~1e-8. The policies themselves (log-probs) are compared at 1e-5.
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

# 245 queries: 171 training groups (a last batch of 11) and 37 held-out ones, so the ranks' shares are uneven
# and the all-gathers pad.
TINY = [
    "progress=false",
    "data.synthetic.n_queries=245",
    "sft.epochs=3",
    "rce.epochs=2",
    "grpo.epochs=3",
    "grpo.samples=sampled",
    "grpo.adv_scale=batch",
]

pytestmark = pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
    reason="torchrun is not installed",
)


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


GAUGE = "cand_tower.2.bias"  # the default TwoTower's candidate output bias (see the module docstring)


def _policy(path: Path) -> torch.nn.Module:
    from v3kit.train.checkpoint import load_checkpoint
    from v3kit.train.model import ModelConfig, build_model

    ck = load_checkpoint(path)
    model = build_model(ModelConfig(**ck["model_config"]), ck["query_dim"], ck["cand_dim"])
    model.load_state_dict(ck["model"])
    return model


def _log_probs(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    from v3kit.train.model import policy_log_probs

    g = torch.Generator().manual_seed(seed)
    qx = torch.randn(64, model.query_tower[0].in_features, generator=g)
    cx = torch.randn(64, 8, model.cand_tower[0].in_features, generator=g)
    with torch.no_grad():
        return policy_log_probs(model, qx, cx, torch.ones(64, 8, dtype=torch.bool), 1.0)


def test_the_candidate_output_bias_is_invisible_to_the_policy():
    """Why one bias is exempt from the 1e-5 weight check: in float64 its gradient is zero and shifting it changes no
    log-prob, while every other parameter has a real gradient."""
    from v3kit.train.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(), 16, 16).double()
    qx, cx = torch.randn(32, 16, dtype=torch.float64), torch.randn(32, 8, 16, dtype=torch.float64)
    mask = torch.ones(32, 8, dtype=torch.bool)
    from v3kit.train.model import policy_log_probs

    logp = policy_log_probs(model, qx, cx, mask, 1.0)
    target = torch.softmax(torch.randn(32, 8, dtype=torch.float64), -1)
    (-(target * logp).sum(-1).mean()).backward()  # a reward-weighted cross-entropy
    grads = {k: float(p.grad.abs().max()) for k, p in model.named_parameters()}
    assert grads[GAUGE] < 1e-14
    assert min(v for k, v in grads.items() if k != GAUGE) > 1e-6
    with torch.no_grad():
        dict(model.named_parameters())[GAUGE].add_(torch.randn(model.cand_tower[2].out_features, dtype=torch.float64))
        assert float((policy_log_probs(model, qx, cx, mask, 1.0) - logp).abs().max()) < 1e-12


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
        gap = {k: float((wa[k] - wb[k]).abs().max()) for k in wa}
        assert max(v for k, v in gap.items() if k != GAUGE) < 1e-5, (name, gap)
        assert gap[GAUGE] < 1e-4, (name, gap)  # noise-driven Adam steps of ~lr each, see the module docstring
        assert float((_log_probs(_policy(a1 / name)) - _log_probs(_policy(b2 / name))).abs().max()) < 1e-5, name


@pytest.mark.slow
def test_a_run_resumes_under_another_world_size(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    _run(whole, 1)
    _run(split, 2, "grpo.epochs=2")  # two ranks stop after GRPO epoch 2 ...
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "v3kit",
            "run",
            "--resume",
            *[a for s in [*TINY, f"run_dir={split}"] for a in ("--set", s)],
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]  # ... and one process finishes epoch 3
    a, b = _numbers(whole / "metrics.csv"), _numbers(split / "metrics.csv")
    assert a.shape == b.shape and float((a - b).abs().max().max()) < 1e-5
