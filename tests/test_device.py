"""The ``device`` / ``precision`` / ``threads`` / ``log_every`` keys, and CPU numbers that did not move.

``tests/data/device_golden.json`` was written by ``tests/data/make_device_golden.py`` (its docstring says how) on
the commit just before these keys existed, when every per-step statistic was read back with ``.item()`` as soon
as it was computed: the tiny pipeline's stage table, every number of its ``metrics.csv`` and a SHA-256 of the
final GRPO weights, for the default GRPO and for ``grpo.samples=sampled`` (the mode that draws random numbers per
step). The runs below must reproduce it on the CPU, whatever ``device`` spelling and ``log_every``: within float32
rounding tolerances (the file is one CPU's; another's vector kernels round differently), and bit for bit between
two runs on the same machine.
"""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY, tiny_config

from v3kit.cli import main
from v3kit.config import ConfigError, load_config
from v3kit.data import iterate_batches
from v3kit.pipeline import prepare_data, resolve_runtime, run_pipeline
from v3kit.train import device as D
from v3kit.train.checkpoint import load_checkpoint, save_checkpoint
from v3kit.train.grpo import GRPOConfig, run_grpo
from v3kit.train.model import ModelConfig, build_model, compute_log_probs, policy_log_probs
from v3kit.train.sft import freeze

DATA = Path(__file__).parent / "data"
GOLDEN = json.loads((DATA / "device_golden.json").read_text())
_spec = importlib.util.spec_from_file_location("make_device_golden", DATA / "make_device_golden.py")
make_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_golden)


NEWER_COLUMNS = {"clip_ratio/low_mean", "clip_ratio/high_mean"}

# Cross-machine tolerances. Vector math kernels (exp, log, sums) round differently on another CPU (AVX2 against
# AVX-512, say) or thread count: each op by about one float32 ulp, EPS32 = 1.2e-7 relative, compounded over the tiny
# run's ~50 optimizer steps. Measured between two CPUs: <= 2e-6 relative on values that are not small differences
# of larger ones, so RTOL = 1e-4 leaves a 50x margin. Some columns *are* such differences: a mean of ratio x advantage
# (loss, pg_loss: operands ~1, value ~1e-3), a KL (kl: exp(d) - 1 - d of ratios ~1; kl_to_sft: pi (log pi - log ref)
# of log-probs ~ the entropy, < 2; values ~1e-5), the spread of ratios ~1 (step0_ratio_std). Their rounding error
# scales with the operands, not the value (measured: 2.5e-8 on loss, 1.3e-8 on kl_to_sft, 1e-3 relative on a
# kl_to_sft of 9e-6), so each column's atol is ATOL_ULPS float32 ulps of its operands' magnitude: by default its
# own largest |value| (atol only matters near 0 there), else OPERAND_SCALE.
EPS32 = float(torch.finfo(torch.float32).eps)
RTOL = 1e-4
ATOL_ULPS = 8  # 8 x EPS32 x scale: ~1e-6 for operands ~1, 40-150x the measured cross-CPU differences
OPERAND_SCALE = {"loss": 1.0, "pg_loss": 1.0, "kl": 1.0, "kl_to_sft": 2.0, "step0_ratio_std": 1.0}


# The candidate tower's last bias moves every candidate's embedding by the same vector b, which adds q.b to every
# score of a group: the group's softmax (every loss here) does not see it, so its gradient is 0 up to rounding, and
# Adam, which divides by the gradient's size, steps it by that rounding noise. Its values are then one CPU's noise
# (measured: 1.6e-4 relative in its L1 between this file and an AVX2 AMD EPYC, against < 1e-8 for every other weight),
# so only its size is compared (test_the_candidate_towers_last_bias_does_not_change_any_log_prob shows the invariance).
SHIFT_INVARIANT = {"cand_tower.2.bias"}
NOISE_RTOL = 1e-2


def _atol(column: str, values: list) -> float:
    nums = [abs(v) for v in values if isinstance(v, float) and math.isfinite(v)]
    return ATOL_ULPS * EPS32 * max(OPERAND_SCALE.get(column, 0.0), max(nums, default=0.0))


def _assert_columns_close(got: dict, gold: dict, where: str) -> None:
    """Every golden column, row for row: strings and missing values equal, numbers within RTOL and the column's atol."""
    for c, want in gold.items():
        have = got.get(c)
        assert have is not None and len(have) == len(want), f"{where}: column {c} has {have and len(have)} rows"
        atol = _atol(c, want)
        for i, (h, w) in enumerate(zip(have, want)):
            if isinstance(w, float) and isinstance(h, float):
                assert math.isclose(h, w, rel_tol=RTOL, abs_tol=atol), (
                    f"{where}: {c}[{i}] = {h!r}, golden {w!r} (rtol {RTOL:g}, atol {atol:.2g})"
                )
            else:
                assert h == w, f"{where}: {c}[{i}] = {h!r}, golden {w!r}"


def _metrics_columns(run_dir: Path) -> dict:
    m = pd.read_csv(run_dir / "metrics.csv")
    return {c: [None if pd.isna(v) else (v if isinstance(v, str) else float(v)) for v in m[c]] for c in m.columns}


def _assert_golden(case: str, run_dir: Path, table: pd.DataFrame | None = None) -> None:
    gold = GOLDEN[case]
    got = _metrics_columns(run_dir)
    # Columns logged since the golden file was made may be added; every column it has must match, row for row.
    assert set(got) - set(gold["metrics"]) <= NEWER_COLUMNS, sorted(set(got) - set(gold["metrics"]))
    _assert_columns_close(got, gold["metrics"], f"{case} metrics.csv")
    ckpt = torch.load(run_dir / "grpo_epoch3.pt", weights_only=True)
    stats = make_golden.weights_stats(_StateOnly(ckpt["model"]))
    assert set(stats) == set(gold["grpo_weights_stats"])
    for name, (total, l1, l2) in stats.items():
        want_total, want_l1, want_l2 = gold["grpo_weights_stats"][name]
        if name in SHIFT_INVARIANT:  # Adam's steps on rounding noise: the same size, not the same values
            assert math.isclose(l1, want_l1, rel_tol=NOISE_RTOL) and math.isclose(l2, want_l2, rel_tol=NOISE_RTOL)
            continue
        # every weight within RTOL of its golden value bounds the drift of their sum by RTOL x sum |w|
        assert math.isclose(total, want_total, rel_tol=RTOL, abs_tol=RTOL * want_l1), (name, total, want_total)
        assert math.isclose(l1, want_l1, rel_tol=RTOL) and math.isclose(l2, want_l2, rel_tol=RTOL), (name, l1, l2)
    if table is not None:
        got = {stage: {k: float(v) for k, v in row.items()} for stage, row in table.iterrows()}
        # 'selected' (the model the run ships) came later; with the default select=last it is the GRPO row
        assert set(got) == set(gold["table"]) | {"selected"} and got["selected"] == got["grpo"]
        assert all(set(got[s]) == set(gold["table"][s]) for s in gold["table"])
        columns = {k: [got[s][k] for s in gold["table"]] for k in gold["table"]["sft"]}
        gold_columns = {k: [gold["table"][s][k] for s in gold["table"]] for k in gold["table"]["sft"]}
        _assert_columns_close(columns, gold_columns, f"{case} stage table")


def _assert_bitwise_same(a: Path, b: Path) -> None:
    """Two runs of the same config on this machine: every logged number and every saved weight, bit for bit."""
    assert (a / "summary.csv").read_bytes() == (b / "summary.csv").read_bytes()
    pd.testing.assert_frame_equal(pd.read_csv(a / "metrics.csv"), pd.read_csv(b / "metrics.csv"), check_exact=True)
    names = sorted(p.name for p in a.glob("*.pt"))
    assert names and names == sorted(p.name for p in b.glob("*.pt"))
    for name in names:
        wa, wb = (torch.load(d / name, weights_only=True)["model"] for d in (a, b))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


class _StateOnly(torch.nn.Module):
    """Wraps a saved state dict so the golden's weight digest can read it."""

    def __init__(self, state: dict) -> None:
        super().__init__()
        self._state = state

    def state_dict(self, *args, **kwargs):  # noqa: D401 - same contract as nn.Module.state_dict
        return self._state


def test_cpu_runs_reproduce_the_numbers_from_before_device_support(tmp_path, capsys):
    # device=cpu through the CLI, statistics read back every step ...
    cli_dir = tmp_path / "cli"
    rc = main(["run", *[a for o in (*TINY, f"run_dir={cli_dir}", "device=cpu", "log_every=1") for a in ("--set", o)]])
    assert rc == 0
    header = capsys.readouterr().out.splitlines()
    assert any(ln.startswith("v3kit run: device cpu, precision fp32, threads ") for ln in header), header
    _assert_golden("default", cli_dir)

    # ... and the default device (auto = cpu here) through the API, read back every 7 steps: the same numbers,
    # still one row per step, and callbacks see every row in order.
    seen = []

    class Rows:
        def on_step(self, row):
            seen.append((row["stage"], row["step"], row["loss"]))

    api_dir = tmp_path / "api"
    r = run_pipeline(tiny_config(api_dir, "log_every=7"), callbacks=[Rows()])
    assert r.runtime.device == torch.device("cpu") and r.runtime.precision == "fp32"
    _assert_golden("default", api_dir, r.table)
    _assert_bitwise_same(api_dir, cli_dir)  # same machine, same process: deterministic to the bit
    train = pd.read_csv(api_dir / "metrics.csv").query("split == 'train'")
    assert seen == list(zip(train["stage"], train["step"], train["loss"]))
    for stage, rows in train.groupby("stage"):
        assert rows["step"].tolist() == list(range(1, len(rows) + 1)), stage


def test_sampled_grpo_draws_on_the_cpu_generator_as_before(tmp_path):
    run_dir = tmp_path / "s"
    r = run_pipeline(tiny_config(run_dir, *make_golden.CASES["sampled"], "device=cpu", "log_every=4"))
    _assert_golden("sampled", run_dir, r.table)
    # Run again: the draws come from the seeded CPU generator, so the second run is the first, bit for bit.
    again = tmp_path / "again"
    run_pipeline(tiny_config(again, *make_golden.CASES["sampled"], "device=cpu", "log_every=1"))
    _assert_bitwise_same(run_dir, again)


def test_golden_tolerances_pass_cross_cpu_drift_and_catch_real_changes():
    """The comparison itself: the golden file passes against itself nudged by float32-rounding-sized drift, and fails
    on a change a bug would make (a KL 10% off, a loss moved by 1e-5, a mis-ranked acc@1)."""
    gold = GOLDEN["default"]["metrics"]
    _assert_columns_close(gold, gold, "self")

    def nudged(column: str, f) -> dict:
        return {**gold, column: [f(v) if isinstance(v, float) else v for v in gold[column]]}

    for column in ("loss", "kl", "kl_to_sft", "entropy", "grad_norm", "ratio_mean", "pg_loss"):
        # drift as measured between two CPUs: ~1e-5 relative, plus ~2e-8 absolute on cancelling values
        _assert_columns_close(nudged(column, lambda v: v * (1 + 1e-5) + 2e-8), gold, "drift")
    for column, change in (
        ("kl", lambda v: 1.1 * v),
        ("kl_to_sft", lambda v: 1.1 * v),
        ("loss", lambda v: v + 1e-5),
        ("acc@1", lambda v: v + 1 / 36),
        ("entropy", lambda v: v * (1 + 3e-4)),
    ):
        with pytest.raises(AssertionError, match=column):
            _assert_columns_close(nudged(column, change), gold, "changed")


def test_checkpoints_hold_only_cpu_tensors(tmp_path):
    r = run_pipeline(tiny_config(tmp_path / "r", "sft.epochs=1", "rce.epochs=1", "grpo.epochs=1"))
    files = sorted(r.run_dir.glob("*.pt"))
    assert {p.name for p in files} >= {"sft.pt", "rce_epoch1.pt", "grpo_epoch1.pt"}

    def devices(tree):
        if isinstance(tree, torch.Tensor):
            return {tree.device.type}
        if isinstance(tree, dict):
            return set().union(*map(devices, tree.values())) if tree else set()
        if isinstance(tree, (list, tuple)):
            return set().union(*map(devices, tree)) if tree else set()
        return set()

    for p in files:  # no map_location: tensors come back on the device they were saved from
        assert devices(torch.load(p, weights_only=True)) == {"cpu"}, p.name
    # save_checkpoint itself moves tensors to the CPU (nested containers included) and keeps CPU ones as they are.
    t = torch.arange(3.0)
    tree = D.to_cpu({"a": [t, (t, 1)], "b": {"c": t}, "d": "x"})
    assert tree["a"][0] is t and tree["a"][1][0] is t and tree["a"][1][1] == 1 and tree["d"] == "x"
    path = save_checkpoint(tmp_path / "x.pt", {"stage": "sft", "w": t})
    assert torch.equal(load_checkpoint(path)["w"], t)


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert D.resolve_device("auto") == torch.device("cuda")
    assert D.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"device='cuda:2'.*2 CUDA device"):
        D.resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert D.resolve_device("auto") == torch.device("cpu")
    assert D.resolve_device("cpu") == torch.device("cpu")
    for missing in ("cuda", "cuda:0", "mps"):
        with pytest.raises(ValueError, match=rf"device='{missing}'.*set device=auto or device=cpu"):
            D.resolve_device(missing)


def test_bad_or_missing_devices_fail_in_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    for bad in ("gpu", "cuda:x", "CUDA", "cuda:-1"):
        with pytest.raises(ConfigError, match=r"device must be one of auto, cpu, cuda, cuda:N or mps"):
            load_config(None, [f"device={bad}"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run_dir = tmp_path / "r"
    assert (
        main(["run", "--set", "device=cuda", "--set", f"run_dir={run_dir}", "--set", "data.synthetic.n_queries=40"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "device='cuda' but CUDA is not available" in err
    assert not (run_dir / "config.yaml").exists()


def test_precision_is_validated_and_bf16_is_fp32_off_cuda():
    for bad in ("fp16", "bfloat16", "BF16"):
        with pytest.raises(ConfigError, match=r"precision must be one of \('fp32', 'bf16'\)"):
            load_config(None, [f"precision={bad}"])
    cpu = torch.device("cpu")
    with pytest.warns(UserWarning, match="bf16 is ignored on cpu"):
        assert D.resolve_precision("bf16", cpu) == "fp32"
    assert D.resolve_precision("fp32", cpu) == "fp32"
    assert D.resolve_precision("bf16", torch.device("cuda")) == "bf16"
    assert isinstance(D.autocast(cpu, "bf16"), type(D.autocast(cpu, "fp32")))  # a no-op on the CPU
    rt = D.Runtime(device=cpu, precision="fp32", threads=1, requested_precision="bf16")
    assert rt.describe() == "device cpu, precision fp32 (bf16 ignored off CUDA), threads 1"


def test_threads_auto_rule_and_validation(tmp_path):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    big, small = 10 * D.SMALL_MODEL_PARAMS, 5000
    assert D.resolve_threads("auto", cpu, big, cores=2) == 1  # a 2-core machine: leave the other core alone
    assert D.resolve_threads("auto", cpu, small, cores=32) == 1  # tiny towers: threads only add sync cost
    assert D.resolve_threads("auto", cuda, big, cores=32) == 1  # the GPU computes
    assert D.resolve_threads("auto", cpu, big, cores=4) == 4
    assert D.resolve_threads("auto", cpu, big, cores=64) == D.MAX_AUTO_THREADS
    assert D.resolve_threads("auto", cpu, None, cores=4) == 4  # unknown size: treated as large
    assert D.resolve_threads(3, cpu, small, cores=2) == 3
    for bad in (0, -1, "many", 1.5):
        with pytest.raises(ConfigError, match="threads"):
            load_config(None, [f"threads={bad}"])
    with pytest.raises(ConfigError, match="log_every must be >= 1"):
        load_config(None, ["log_every=0"])
    # The default model is small: auto resolves to one thread, and sizing it draws nothing from torch's RNG.
    cfg = tiny_config(tmp_path / "t")
    splits = prepare_data(cfg)
    rng = torch.get_rng_state()
    assert resolve_runtime(cfg, splits).threads == 1
    assert torch.equal(rng, torch.get_rng_state())


def test_sft_reference_log_probs_read_once_equal_per_batch_recomputation():
    cfg = tiny_config("unused")
    splits = prepare_data(cfg)
    torch.manual_seed(0)
    ref = freeze(build_model(ModelConfig(), splits.train.query_dim, splits.train.cand_dim))
    t = 0.7
    once = compute_log_probs(ref, splits.train, t)
    g = torch.Generator().manual_seed(0)
    for batch in iterate_batches(splits.train, 32, shuffle=True, generator=g):
        with torch.no_grad():
            per_batch = policy_log_probs(ref, batch.query_x, batch.cand_x, batch.mask, t)
        got = once[batch.index]
        assert torch.equal(torch.isinf(got), ~batch.mask) and torch.equal(torch.isinf(per_batch), ~batch.mask)
        assert torch.allclose(got[batch.mask], per_batch[batch.mask], rtol=0, atol=1e-6)
    # In a run: the policy starts as the reference, so the first step's KL to it is 0 (k3 of identical policies).
    policy = freeze(ref).requires_grad_(True)
    r = run_grpo(
        policy,
        splits,
        once,
        GRPOConfig(epochs=1, kl_reference="sft", lr=1e-3),
        reference=ref,
        temperature=t,
        progress=False,
    )
    kl = r.train_history["kl"].tolist()
    assert kl[0] == pytest.approx(0.0, abs=1e-7) and kl[-1] > 1e-9 and all(math.isfinite(k) for k in kl)


def test_as_floats_matches_item_exactly():
    vals = [torch.tensor(1 / 3), torch.tensor(1e-30), torch.tensor(2.5, dtype=torch.float64), torch.tensor(True)]
    assert D.as_floats(vals) == [v.item() for v in vals]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert D.as_floats([]) == []


@pytest.mark.parametrize("switches", [{}, {"adv_scale": "none", "baseline": 0.5}, {"drop_zero_std_groups": True}])
def test_advantages_read_once_equal_per_batch_computation(switches):
    from v3kit.train.grpo import per_group_advantages, per_group_terms
    from v3kit.train.losses import group_advantages, zero_std_groups

    cfg = GRPOConfig(**switches)
    assert per_group_advantages(cfg)
    assert not per_group_advantages(GRPOConfig(adv_scale="batch"))
    assert not per_group_advantages(GRPOConfig(samples="sampled"))
    train = prepare_data(tiny_config("unused")).train
    no_signal, adv = per_group_terms(train.rewards, train.mask, cfg)
    for batch in iterate_batches(train, 32, shuffle=True, generator=torch.Generator().manual_seed(1)):
        want = group_advantages(batch.rewards, batch.mask, scale=cfg.adv_scale, eps=cfg.adv_eps, baseline=cfg.baseline)
        assert torch.equal(adv[batch.index], want)  # bit for bit: a group's advantages are its own business
        assert torch.equal(no_signal[batch.index], zero_std_groups(batch.rewards, batch.mask))


def test_the_candidate_towers_last_bias_does_not_change_any_log_prob():
    """Why SHIFT_INVARIANT's weights are compared by size only: any change of the candidate tower's last bias
    leaves every candidate's log-prob as it was (float32 rounding apart), so no loss has a gradient for it."""
    splits = prepare_data(tiny_config("unused"))
    torch.manual_seed(0)
    model = build_model(ModelConfig(), splits.train.query_dim, splits.train.cand_dim)
    before = compute_log_probs(model, splits.val, 1.0)
    (name,) = SHIFT_INVARIANT
    with torch.no_grad():
        dict(model.named_parameters())[name].add_(torch.randn(model.cand_tower[2].bias.shape) * 3.0)
    after = compute_log_probs(model, splits.val, 1.0)
    assert torch.allclose(before, after, atol=1e-5)
    with torch.no_grad():  # the other weights do change them (the check can fail)
        model.cand_tower[0].bias.add_(torch.randn(model.cand_tower[0].bias.shape) * 3.0)
    assert not torch.allclose(before, compute_log_probs(model, splits.val, 1.0), atol=1e-3)
