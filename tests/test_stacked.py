"""The stacked trainer (``v3kit.train.stacked``, ``v3kit.pipeline_stacked``): K runs trained as one model must give
each run what its own sequential run gives, within float32 rounding: every logged per-step value (loss, KL, ratio,
clipping, gradient norm), every held-out evaluation, the selected epoch and the final test table. Also: Adam and the
clipping against torch's own, the fallback for runs the stack cannot batch, and a resume after a kill mid-stack.
User models (torch.func's vmap stack, its fallbacks): tests/test_stacked_func.py."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import tiny_config

from v3kit.config import load_config
from v3kit.pipeline import prepare_data, run_pipeline
from v3kit.pipeline_stacked import run_stacked
from v3kit.train.model import ModelConfig, TwoTower, build_model
from v3kit.train.stacked_towers import StackedTowers

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.synthetic.n_queries=150", "sft.epochs=2", "rce.epochs=2", "grpo.epochs=2", "data.split_seed=0"]
# float32 rounding: the stack's batched matmuls and per-member reductions add in another order than mm does
RTOL, ATOL = 2e-4, 2e-5
# The candidate tower's output bias b adds <q, b> to every candidate of a group, which the group softmax ignores: its
# gradient is float32 rounding noise, which Adam scales up to full-size steps, so it is the one weight that drifts
# apart between any two arithmetic orders (tests/test_distributed.py sees the same); the loss cannot see it.
GAUGE = "cand_tower.2.bias"


def _configs(root: Path, tag: str, variants: list[list[str]], common: list[str]) -> list:
    return [tiny_config(root / f"{tag}{i}", *SMALL, *common, *v) for i, v in enumerate(variants)]


def _assert_same_run(a: Path, b: Path) -> None:
    """Run dirs ``a`` (sequential) and ``b`` (stacked) hold the same metrics, selection and test table."""
    ma, mb = pd.read_csv(a / "metrics.csv"), pd.read_csv(b / "metrics.csv")
    assert list(ma.columns) == list(mb.columns)
    assert ma[["stage", "split", "epoch", "step"]].equals(mb[["stage", "split", "epoch", "step"]])
    num = [c for c in ma.select_dtypes("number").columns if c not in ("epoch", "step")]
    pd.testing.assert_frame_equal(ma[num], mb[num], check_exact=False, rtol=RTOL, atol=ATOL)
    for col in ("loss", "kl", "ratio_mean", "clip_ratio", "grad_norm"):  # the per-step values the issue names
        assert col in num
    sa, sb = json.loads((a / "selected.json").read_text()), json.loads((b / "selected.json").read_text())
    assert (sa["stage"], sa["epoch"]) == (sb["stage"], sb["epoch"])
    ta, tb = pd.read_csv(a / "summary.csv", index_col=0), pd.read_csv(b / "summary.csv", index_col=0)
    pd.testing.assert_frame_equal(ta, tb, check_exact=False, rtol=RTOL, atol=ATOL)
    for stage in ("sft", "rce", "grpo"):
        wa = torch.load(sorted(a.glob(f"{stage}_epoch*.pt"))[-1], weights_only=True)
        wb = torch.load(sorted(b.glob(f"{stage}_epoch*.pt"))[-1], weights_only=True)
        for name, t in wa["model"].items():
            if name != GAUGE:
                torch.testing.assert_close(t, wb["model"][name], rtol=RTOL, atol=ATOL, msg=name)
        assert wa["rng"]["generator"].equal(wb["rng"]["generator"])  # the same batch order and draws
        assert json.loads(wa["metrics_rows"])[-1]["step"] == json.loads(wb["metrics_rows"])[-1]["step"]


def _compare(tmp_path: Path, variants: list[list[str]], common: list[str] = (), expect_stacked: bool = True) -> None:
    common = list(common)
    for cfg in _configs(tmp_path, "seq", variants, common):
        run_pipeline(cfg)
    out = run_stacked(_configs(tmp_path, "stk", variants, common))
    assert out.stacked is expect_stacked, out.notes
    for i, r in enumerate(out.results):
        assert not isinstance(r, BaseException), r
        _assert_same_run(tmp_path / f"seq{i}", tmp_path / f"stk{i}")


@pytest.mark.slow
def test_seeds_stacked_match_their_sequential_runs(tmp_path):
    _compare(tmp_path, [["seed=0"], ["seed=1"], ["seed=2"]])


NUMERIC = {
    "lr": ["sft.lr=3e-3", "rce.lr=5e-5", "grpo.lr=3e-5"],
    "kl_beta": ["grpo.kl_beta=0.4"],
    "clip range": ["grpo.eps_low=0.1", "grpo.eps_high=0.3"],
    "label_weight": ["rce.label_weight=0.4"],
    "rce temperatures": ["rce.t_start=3.0", "rce.t_end=0.3"],
    "sim_temperature": ["model.sim_temperature=0.5"],
    "entropy_coef": ["grpo.entropy_coef=0.05"],
    "max_grad_norm": ["grpo.max_grad_norm=0.05", "sft.max_grad_norm=0.5"],
    "weight_decay": ["sft.weight_decay=0.01", "grpo.weight_decay=0.05"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NUMERIC))
def test_numeric_variants_stacked_match_their_sequential_runs(tmp_path, name):
    # one member at the defaults, one with the changed number (and another seed), one both
    _compare(tmp_path, [["seed=0"], ["seed=1", *NUMERIC[name]], ["seed=0", *NUMERIC[name]]])


@pytest.mark.slow
def test_logit_annealing_and_sampled_grpo_match(tmp_path):
    # samples: sampled draws from each member's own generator (the per-member Stage.step path); temperature_target
    # logits anneals the policy's own temperature per member
    # select: best_val also makes SFT ship its best val epoch (each member its own)
    common = ["grpo.samples=sampled", "grpo.num_samples=6", "rce.temperature_target=logits", "select=best_val"]
    _compare(tmp_path, [["seed=0"], ["seed=1", "grpo.kl_beta=0.3"]], common)


@pytest.mark.slow
def test_other_grpo_switches_match(tmp_path):
    variants = [
        ["grpo.kl_reference=sft", "grpo.samples=exact"],
        ["grpo.kl_reference=sft", "grpo.samples=exact", "seed=1", "grpo.kl_beta=0.02"],
    ]
    _compare(tmp_path, variants, ["grpo.old_policy=refresh_each_epoch", "rce.reward_norm=zscore"])


@pytest.mark.slow
def test_members_that_differ_in_switches_match_their_sequential_runs(tmp_path, monkeypatch):
    """One stack whose members differ in switches, not only in numbers: members whose switches share an objective
    train under one stacked objective per switch setting (objective_key), a member whose switches no stacked
    objective covers (sampled GRPO) through its own Stage.step, all in the same steps; each matches its own run."""
    from v3kit.train import stacked

    variants = [
        ["seed=0"],
        ["seed=1", "grpo.samples=sampled", "grpo.num_samples=6"],  # its own Stage.step
        ["seed=2", "grpo.kl_estimator=k2", "rce.reward_norm=zscore"],  # another objective in RCE and GRPO
        ["seed=0", "grpo.old_policy=refresh_each_epoch", "grpo.kl_beta=0.3"],  # member 0's objective
        ["seed=1", "reward.debias=candidate_features", "select=best_val"],  # its own training rewards
        ["seed=2", "grpo.kl_estimator=k2", "grpo.loss_type=cispo"],
    ]
    seen = []
    objectives = stacked._StackedFit._objectives

    def spy(self, live, stages):
        groups, alone, back = objectives(self, live, stages)
        order = [j for _, js, rows in groups for j in js] + alone
        assert all(rows.tolist() == js for _, js, rows in groups)
        assert [order[i] for i in back.tolist()] == list(range(len(live)))  # back undoes the groups' order
        seen.append((self.name, sorted(js for _, js, _ in groups), list(alone)))
        return groups, alone, back

    monkeypatch.setattr(stacked._StackedFit, "_objectives", spy)
    _compare(tmp_path, variants)
    split = {name: (groups, alone) for name, groups, alone in seen}
    assert split["sft"] == ([[0, 1, 2, 3, 4, 5]], [])
    assert split["rce"] == ([[0, 1, 3, 4, 5], [2]], [])
    assert split["grpo"] == ([[0, 3, 4], [2], [5]], [1])


def test_ragged_groups_and_a_ragged_last_batch_are_covered():
    cfg = tiny_config("/nonexistent", *SMALL)
    assert cfg.data.synthetic.min_group_size < cfg.data.synthetic.group_size  # groups of 4..8 candidates
    from v3kit.pipeline import prepare_data

    n = len(prepare_data(cfg).train)
    assert n % cfg.sft.batch_size and n % cfg.grpo.batch_size  # every stage ends its epochs on a short batch


# ---------------------------------------------------------------------------------------------- pieces
def _members(k: int, **kw) -> list[TwoTower]:
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        out.append(TwoTower(6, 6, [7, 5], 4, **kw))
    return out


@pytest.mark.parametrize("kw", [{}, {"normalize": True}, {"residual": True}])
def test_stacked_scores_and_gradients_equal_each_members_own(kw):
    members = _members(3, **kw)
    tower = StackedTowers(members)
    torch.manual_seed(9)
    q, c = torch.randn(3, 5, 6), torch.randn(3, 5, 4, 6)
    scores = tower.scores(q, c)
    (scores * torch.arange(1.0, 4.0).view(3, 1, 1)).sum().backward()
    for k, m in enumerate(members):
        own = torch.einsum("bd,bgd->bg", m.encode_query(q[k]), m.encode_candidates(c[k]))
        torch.testing.assert_close(scores[k], own)
        (own.sum() * (k + 1)).backward()
        for name, p in m.named_parameters():
            torch.testing.assert_close(tower.member(name, k, tower.params[name].grad), p.grad, rtol=1e-5, atol=1e-6)


def test_stacked_adam_and_clipping_equal_torch_per_member():
    members = _members(3)
    tower = StackedTowers(members)
    lrs, max_norms = [1e-3, 3e-2, 1e-4], [0.5, math.inf, 2.0]
    opts = [torch.optim.Adam(m.parameters(), lr=lr) for m, lr in zip(members, lrs)]
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        frozen = [False, step == 2, False]  # member 1 skips a batch: no update, its step count waits
        tower.zero_grad()
        for k, m in enumerate(members):
            for name, p in m.named_parameters():
                g = torch.randn(p.shape, generator=gen) * (k + 1)
                p.grad = g.clone()
                tower.member(name, k, tower.params[name].grad).copy_(g)
        norms = tower.clip(torch.tensor(max_norms))
        tower.adam_step(lrs, frozen)
        for k, (m, opt) in enumerate(zip(members, opts)):
            norm = torch.nn.utils.clip_grad_norm_(list(m.parameters()), max_norms[k])
            torch.testing.assert_close(norms[k], norm)
            if not frozen[k]:
                opt.step()
    for k, m in enumerate(members):
        for name, p in m.named_parameters():
            torch.testing.assert_close(tower.member(name, k).detach(), p.detach(), rtol=1e-6, atol=1e-7)
        for p, state in zip(m.parameters(), tower.adam_state(k)):  # what a member's checkpoint stores
            own = opts[k].state[p]
            assert float(state["step"]) == float(own["step"])
            torch.testing.assert_close(state["exp_avg"], own["exp_avg"])
            torch.testing.assert_close(state["exp_avg_sq"], own["exp_avg_sq"])


def test_stacked_adam_is_torch_s_fused_adam_per_member():
    """The stack's Adam is ``torch.optim.Adam(fused=True)`` for each member: learning rates and weight decays that
    differ (one kernel call per pair), a member skipping a batch (its step count waits). Equal to the last bits the
    kernel's vector lanes allow: an element lies in another lane (or in the scalar tail) in the stack's flat row
    than in its own parameter, and the lanes round their multiply-adds differently."""
    members, alone = _members(3), _members(3)
    tower = StackedTowers(members)
    lrs, wds = [1e-3, 3e-2, 1e-3], [0.0, 0.1, 0.0]
    opts = [torch.optim.Adam(m.parameters(), lr=lr, weight_decay=wd, fused=True) for m, lr, wd in zip(alone, lrs, wds)]
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        frozen = [step == 4, step == 2, False]
        tower.zero_grad()
        for k, m in enumerate(alone):
            for name, p in m.named_parameters():
                p.grad = torch.randn(p.shape, generator=gen) * (k + 1)
                tower.member(name, k, tower.params[name].grad).copy_(p.grad)
        tower.adam_step(lrs, frozen, wds)
        for k, opt in enumerate(opts):
            if not frozen[k]:
                opt.step()
    assert tower.steps == [5, 5, 6]
    for k, m in enumerate(alone):
        for (name, p), state in zip(m.named_parameters(), tower.adam_state(k)):
            own = opts[k].state[p]
            torch.testing.assert_close(tower.member(name, k), p.detach(), rtol=1e-6, atol=1e-8, msg=name)
            torch.testing.assert_close(state["exp_avg"], own["exp_avg"], rtol=5e-7, atol=1e-12, msg=name)
            torch.testing.assert_close(state["exp_avg_sq"], own["exp_avg_sq"], rtol=5e-7, atol=1e-12, msg=name)


# ---------------------------------------------------------------------------------------------- fallback
def test_members_that_cannot_share_data_run_one_after_another(tmp_path):
    cfgs = [tiny_config(tmp_path / f"r{i}", *SMALL, f"data.split_seed={i}", "sft.epochs=1") for i in range(2)]
    cfgs = [c for c in cfgs]
    out = run_stacked(cfgs)
    assert not out.stacked and "split seed" in out.notes[0]
    assert all(not isinstance(r, BaseException) for r in out.results)


def test_the_stack_refuses_a_custom_model_with_a_reason():
    from v3kit.train.stacked_towers import stack_reason

    class Other(TwoTower):
        pass

    cfg = ModelConfig()
    assert stack_reason([build_model(cfg, 4, 4), build_model(cfg, 4, 4)]) is None
    assert "Other" in stack_reason([Other(4, 4), Other(4, 4)])


# ---------------------------------------------------------------------------------------------- resume
STACK_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from v3kit.pipeline_stacked import run_stacked
cfgs = [tiny_config({root!r} + f"/m{{i}}", *{small!r}, f"seed={{i}}", f"grpo.kl_beta={{0.1 * (i + 1)}}") for i in range(3)]
out = run_stacked(cfgs, resume={resume})
assert out.stacked, out.notes
bad = [r for r in out.results if isinstance(r, BaseException)]
assert not bad, bad
"""


def _stack_process(
    root: Path, resume: bool, kill_at: str | None, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("V3KIT_TEST_KILL_AT", None)
    if kill_at:
        env["V3KIT_TEST_KILL_AT"] = kill_at
    script = STACK_SCRIPT.format(tests=str(ROOT / "tests"), root=str(root), small=[*SMALL, *extra], resume=resume)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_resume_after_a_kill_mid_stack_is_bit_identical(tmp_path):
    assert_resume_is_bit_identical(tmp_path, ("rce:epoch1:step2", "grpo:epoch1:before_checkpoint", "grpo:epoch2:step6"))


def assert_resume_is_bit_identical(tmp_path: Path, kills: tuple[str, ...], extra: tuple[str, ...] = ()) -> None:
    """A stack of 3 killed at each of ``kills`` and resumed ends with the files of the stack run without a kill."""
    ref = _stack_process(tmp_path / "ref", False, None, extra)
    assert ref.returncode == 0, ref.stderr
    crash = tmp_path / "crash"
    for kill_at in kills:
        killed = _stack_process(crash, True, kill_at, extra)
        assert killed.returncode == -9, killed.stderr  # SIGKILL at that point
    done = _stack_process(crash, True, None, extra)
    assert done.returncode == 0, done.stderr
    for i in range(3):
        a, b = tmp_path / f"ref/m{i}", crash / f"m{i}"
        assert (a / "metrics.csv").read_bytes() == (b / "metrics.csv").read_bytes()
        assert (a / "summary.csv").read_bytes() == (b / "summary.csv").read_bytes()
        for ckpt in sorted(a.glob("*_epoch*.pt")):
            wa = torch.load(ckpt, weights_only=True)
            wb = torch.load(b / ckpt.name, weights_only=True)
            for name, t in wa["model"].items():
                assert torch.equal(t, wb["model"][name]), (ckpt.name, name)
            for pid, s in wa["optimizer"]["state"].items():
                assert all(torch.equal(v, wb["optimizer"]["state"][pid][n]) for n, v in s.items())


# ---------------------------------------------------------------------------------------------- grids
def test_plan_stacks_groups_seeds_and_numeric_variants_of_one_structure(tmp_path):
    from v3kit.ablate.grid import parse_grid
    from v3kit.ablate.tasks import RunTask, plan_stacks

    raw = {
        "name": "g",
        "base": ["data.synthetic.n_queries=80"],
        "seeds": [0, 1],
        "reference": "seed",
        "variants": {"seed": [], "kl0": ["grpo.kl_beta=0"], "lw": ["rce.label_weight=0.5"], "ep4": ["grpo.epochs=4"]},
    }
    spec = parse_grid(raw)
    tasks = [
        RunTask(
            "default",
            v,
            s,
            spec.resolve("default", v, s, tmp_path / v / str(s)),
            None,
            tmp_path / "sft.pt",
            tmp_path,
            "",
        )
        for v in spec.variants
        for s in spec.seeds
    ]
    stacks, alone = plan_stacks(tasks)
    assert [sorted((t.variant, t.seed) for t in s.tasks) for s in stacks] == [
        sorted((v, s) for v in ("seed", "kl0", "lw") for s in (0, 1)),  # numbers only: one structure
        [("ep4", 0), ("ep4", 1)],  # other epochs: another stack
    ]
    assert alone == []
    assert plan_stacks(tasks, "off") == ([], tasks)
    with pytest.raises(ValueError, match="stack must be one of"):
        plan_stacks(tasks, "on")


def test_plan_stacks_stacks_the_runs_left_alone_that_differ_only_in_switches(tmp_path):
    """A variant with one seed is a structure of its own; the ones that differ only in switches (the doctor's
    single-switch variants) then stack with each other, after the runs of one structure have stacked."""
    from v3kit.ablate.grid import parse_grid
    from v3kit.ablate.tasks import RunTask, plan_stacks

    raw = {
        "name": "g",
        "base": ["data.synthetic.n_queries=80"],
        "seeds": [0],
        "reference": "seed",
        "variants": {
            "seed": [],
            "kl0": ["grpo.kl_beta=0"],  # numbers only: the run's own structure
            "sampled": ["grpo.samples=sampled"],
            "debias": ["reward.debias=candidate_features"],
            "norm": ["rce.reward_norm=zscore", "grpo.old_policy=refresh_each_epoch"],
            "ep4": ["grpo.epochs=4"],  # other epochs: cannot share a lockstep stack
            "wide": ["model.hidden=[128]"],  # another model
        },
    }
    spec = parse_grid(raw)
    tasks = [
        RunTask("default", v, 0, spec.resolve("default", v, 0, tmp_path / v), None, tmp_path / "sft.pt", tmp_path, "")
        for v in spec.variants
    ]
    stacks, alone = plan_stacks(tasks)
    assert [[t.variant for t in s.tasks] for s in stacks] == [["seed", "kl0"], ["sampled", "debias", "norm"]]
    assert [t.variant for t in alone] == ["ep4", "wide"]


def test_a_stack_may_differ_in_switches_and_the_search_keeps_them_apart():
    """stack_structure: what a stack's members must share (switches may differ; epochs, batch sizes, the model, the
    data and the run-level settings may not). The search's signature is stricter (switches too), never looser."""
    from v3kit.doctor.search_stacked import signature
    from v3kit.stack_structure import stack_structure

    base = load_config(None, ["seed=0", "run_dir=a"])
    switches = [["grpo.samples=sampled"], ["reward.debias=candidate_prior"], ["grpo.old_policy=refresh_each_epoch"]]
    numbers = [["seed=3", "run_dir=b", "grpo.kl_beta=0.5"], ["model.sim_temperature=0.5"], ["sft.lr=0.01"]]
    for sets in switches + numbers + [["select=best_val", "rce.reward_norm=zscore"]]:
        assert stack_structure(load_config(None, sets)) == stack_structure(base), sets
    other = [["grpo.epochs=3"], ["sft.batch_size=32"], ["model.normalize=true"], ["data.synthetic.n_queries=500"]]
    other += [["precision=bf16"], ["grpo.on_nonfinite=skip_batch"], ["model.hidden=[128]"], ["log_every=5"]]
    for sets in other:
        assert stack_structure(load_config(None, sets)) != stack_structure(base), sets
        assert signature(True, load_config(None, sets)) != signature(True, base), sets
    for sets in numbers:
        assert signature(True, load_config(None, sets)) == signature(True, base), sets
    for sets in switches:
        assert signature(True, load_config(None, sets)) != signature(True, base), sets
    assert signature(False, base) != signature(True, base)


@pytest.mark.slow
def test_a_pruned_member_is_masked_out_and_the_others_are_untouched(tmp_path):
    variants = [["seed=0"], ["seed=1", "grpo.kl_beta=0.3"]]
    common = ["grpo.epochs=3", "grpo.on_nonfinite=skip_batch"]
    run_pipeline(_configs(tmp_path, "seq", variants, common)[0])
    out = run_stacked(_configs(tmp_path, "stk", variants, common), prune=lambda k, epoch, metrics: k == 1)
    assert out.stacked
    kept, pruned = out.results
    assert kept.grpo.info.get("pruned") is None and pruned.grpo.info["pruned"] is True
    grpo = pd.read_csv(tmp_path / "stk1/metrics.csv").query("stage == 'grpo'")
    assert grpo["epoch"].max() == 1  # stopped after its first GRPO epoch
    assert sorted(p.name for p in (tmp_path / "stk1").glob("grpo_epoch*.pt")) == ["grpo_epoch1.pt"]
    assert int(grpo["skipped_nonfinite"].fillna(0).sum()) == 0
    _assert_same_run(tmp_path / "seq0", tmp_path / "stk0")


def test_a_stack_pruned_to_one_member_in_sft_is_still_stacked(tmp_path):
    """Two members training their own SFT, one pruned after its first SFT epoch: the other trains RCE and GRPO on
    its own, which is the stack going on, not a fall-back: ``stacked`` stays true and no note says otherwise."""
    from v3kit.train.stacked_members import MemberPruned

    variants = [["seed=0"], ["seed=1", "sft.lr=0.003"]]
    prune_stages = ("sft", "rce", "grpo")
    out = run_stacked(
        _configs(tmp_path, "stk", variants, []),
        prune=lambda k, epoch, metrics: k == 1,
        prune_stages=prune_stages,
    )
    kept, pruned = out.results
    assert isinstance(pruned, MemberPruned) and kept.grpo is not None
    assert out.stacked and out.notes == [], out.notes
    assert pd.read_csv(tmp_path / "stk1/metrics.csv")["stage"].unique().tolist() == ["sft"]


def test_run_stacked_needs_one_sft_checkpoint_per_config_or_one_for_all(tmp_path):
    """A list of SFT checkpoints must name one per config (a missing one is not "train your own"): the error names
    both counts before anything is written."""
    cfgs = _configs(tmp_path, "stk", [["seed=0"], ["seed=1"], ["seed=2"]], [])
    with pytest.raises(ValueError, match="one SFT checkpoint per config, got 2 for 3 configs"):
        run_stacked(cfgs, sft_checkpoint=[tmp_path / "a.pt", tmp_path / "b.pt"])
    with pytest.raises(ValueError, match="got 3 for 3 configs"):
        run_stacked(cfgs, sft_checkpoint=[tmp_path / "a.pt", None, tmp_path / "b.pt"])
    assert not any(Path(c.run_dir).exists() for c in cfgs)


def test_metrics_log_add_many_writes_the_file_row_by_row_adds_write(tmp_path):
    from v3kit.train.metrics_log import MetricsLog

    rows = [
        {"stage": "grpo", "split": "val", "epoch": 0, "step": 0, "acc@1": 0.5},
        {"stage": "grpo", "split": "train", "epoch": 1, "step": 1, "loss": 0.25, "kl": float("nan")},
        {"stage": "grpo", "split": "train", "epoch": 1, "step": 2, "loss": 1e-9, "kl": 0.1, "note": "a,b"},
        {"stage": "grpo", "split": "train", "epoch": 1, "step": 3, "loss": -2.0, "kl": 0.2, "note": 'say "x"'},
    ]
    one, many = MetricsLog(tmp_path / "one"), MetricsLog(tmp_path / "many")
    (tmp_path / "one").mkdir()
    (tmp_path / "many").mkdir()
    for r in rows:
        one.add(dict(r))
    many.add_many([dict(r) for r in rows[:1]])
    many.add_many([dict(r) for r in rows[1:3]])  # brings new columns: one rewrite
    many.add_many([dict(r) for r in rows[3:]])  # appended in one write
    one.close()
    many.close()
    assert (tmp_path / "one/metrics.csv").read_bytes() == (tmp_path / "many/metrics.csv").read_bytes()
    assert one.rows == many.rows and one.columns == many.columns


@pytest.mark.slow
@pytest.mark.parametrize(
    "common",
    [
        ["grpo.dual_clip=3.0", "grpo.entropy_coef=0.01", "grpo.adv_scale=none", "rce.reward_norm=rank"],
        ["grpo.loss_type=cispo", "grpo.samples=exact", "grpo.kl_estimator=k2", "grpo.baseline=0.1"],
    ],
)
def test_the_stacked_objectives_equal_each_members_own_step(tmp_path, monkeypatch, common):
    """stacked_losses against the stages' own step functions, switch by switch, in one stack."""
    from v3kit.train import stacked
    from v3kit.train.stacked_losses import stacked_loss

    variants = [["seed=0"], ["seed=1", "grpo.kl_beta=0.5", "grpo.eps_low=0.1", "rce.label_weight=0.2"]]
    taken = []

    def counted(*args):
        out = stacked_loss(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(stacked, "stacked_loss", counted)
    fast = run_stacked(_configs(tmp_path, "fast", variants, common))
    assert taken and all(taken)  # every step of every stage took the stacked objectives
    monkeypatch.setattr(stacked._StackedFit, "fast", False)
    slow = run_stacked(_configs(tmp_path, "slow", variants, common))
    assert fast.stacked and slow.stacked
    for i in range(2):
        _assert_same_run(tmp_path / f"slow{i}", tmp_path / f"fast{i}")


@pytest.mark.slow
@pytest.mark.parametrize(
    "common",
    [
        ["grpo.entropy_coef=0.01", "grpo.dual_clip=3.0", "rce.reward_norm=zscore"],
        ["grpo.loss_type=cispo", "grpo.samples=exact", "grpo.kl_reference=sft", "grpo.kl_estimator=k3"],
    ],
)
def test_groups_without_padding_skip_the_masks_and_give_the_same_bits(tmp_path, monkeypatch, common):
    """Full groups (every real-text table so far): the stacked objectives leave out every mask operation
    (``b["full"]``). The run is bit for bit the one through the masks, and within float32 rounding its
    sequential runs."""
    from v3kit.train import stacked_losses

    full = ["data.synthetic.min_group_size=8", "data.synthetic.group_size=8", *common]
    variants = [["seed=0"], ["seed=1", "grpo.kl_beta=0.5", "rce.label_weight=0.2"]]
    seen = []
    mask_of = stacked_losses._mask
    monkeypatch.setattr(stacked_losses, "_mask", lambda b: seen.append(b.get("full")) or mask_of(b))
    _compare(tmp_path, variants, full)
    assert seen and all(seen)  # every step took the path without masks
    monkeypatch.setattr(stacked_losses, "_mask", lambda b: b["mask"])  # the masked path
    assert run_stacked(_configs(tmp_path, "masked", variants, full)).stacked
    for i in range(2):
        for name in ("metrics.csv", "summary.csv"):
            assert (tmp_path / f"stk{i}" / name).read_bytes() == (tmp_path / f"masked{i}" / name).read_bytes()


def test_a_checkpoint_write_that_fails_in_the_background_stops_the_stack_naming_its_file(tmp_path, monkeypatch):
    """The epoch checkpoints are written on a background thread while the next epoch trains: a failed write (a
    full disk) still ends the stack with that error, naming the file, and leaves no temp file behind."""
    import errno

    from v3kit.rundir import TEMP_FILE
    from v3kit.train import stacked_members

    real = stacked_members.save_checkpoint

    def save(path, payload):
        if path.name == "rce_epoch1.pt" and path.parent.name == "s1":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, payload)

    monkeypatch.setattr(stacked_members, "save_checkpoint", save)
    cfgs = [tiny_config(tmp_path / f"s{i}", *SMALL, f"seed={i}") for i in range(2)]
    with pytest.raises(OSError) as info:
        run_stacked(cfgs)
    assert info.value.errno == errno.ENOSPC and info.value.filename.endswith("s1/rce_epoch1.pt")
    assert not [p for p in tmp_path.rglob("*") if TEMP_FILE.match(p.name)]
    assert not (tmp_path / "s0" / "grpo_epoch1.pt").exists()  # the stack stopped before GRPO


@pytest.mark.parametrize("model", ["built-in", "vmap", "switches"])
def test_the_members_left_after_pruning_train_on_as_a_smaller_stack_and_match_their_runs(tmp_path, model):
    """Once a quarter of a stack has stopped, the members still training go on as a new, smaller stack (their
    weights, Adam state and step counts carried over): each still equals its sequential run, and a pruned member
    stops where it was pruned. ``vmap``: the built-in TwoTower in a shape only torch.func stacks; ``switches``:
    the members left differ in switches (one on its own step, one under another objective than the pruned ones)."""
    from v3kit.train import stacked

    made: list[int] = []
    real = stacked._StackedFit._restack

    def spy(self):
        before = len(self.rows)
        real(self)
        if len(self.rows) < before:
            made.append(len(self.rows))

    variants = [["seed=0"], ["seed=1"], ["seed=2", "grpo.kl_beta=0.3"], ["seed=3", "grpo.lr=3e-5"]]
    common = ["grpo.epochs=4"]
    if model == "vmap":
        common += ["model.residual=true", "model.residual_kind=linear", "model.sim_temperature=0.1"]
    if model == "switches":
        variants[2] += ["grpo.samples=sampled", "grpo.num_samples=6"]
        variants[3] += ["grpo.kl_estimator=k2"]
    for cfg in _configs(tmp_path, "seq", variants, common)[2:]:
        run_pipeline(cfg)
    prune_at = {0: 1, 1: 2}  # member -> the GRPO epoch after which it stops
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stacked._StackedFit, "_restack", spy)
        out = run_stacked(
            _configs(tmp_path, "stk", variants, common), prune=lambda k, epoch, m: prune_at.get(k) == epoch
        )
    assert out.stacked and made == [3, 2], made  # a quarter stopped after epoch 1, half after epoch 2
    for k, epoch in prune_at.items():
        assert out.results[k].grpo.info["pruned"] is True
        grpo = pd.read_csv(tmp_path / f"stk{k}/metrics.csv").query("stage == 'grpo'")
        assert grpo["epoch"].max() == epoch
    for k in (2, 3):
        _assert_same_run(tmp_path / f"seq{k}", tmp_path / f"stk{k}")


def test_a_stack_whose_arithmetic_it_cannot_save_runs_one_after_another_on_a_cpu(tmp_path, monkeypatch):
    """The estimate is a batch's candidates times the trainable parameters; over the limit of the model's stack
    (CPU_STACK_MAX_MACS for the built-in towers' batched matmuls, CPU_VMAP_MAX_MACS for any other model) the runs
    go one after another with the reason as the note (a GPU always stacks)."""
    from v3kit.train import stacked_plan

    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 1))
    model[1].weight.requires_grad_(False)  # 111 trainable parameters; not the built-in towers: the vmap limit
    monkeypatch.setattr(stacked_plan, "CPU_VMAP_MAX_MACS", 20 * 111)
    monkeypatch.setattr(stacked_plan, "CPU_STACK_MAX_MACS", 0.0)
    assert stacked_plan.arithmetic_reason(model, 20, torch.device("cpu")) is None
    assert "about 0 M multiply-adds" in stacked_plan.arithmetic_reason(model, 21, torch.device("cpu"))
    assert stacked_plan.arithmetic_reason(model, 10**9, torch.device("meta")) is None
    towers = build_model(ModelConfig(hidden=[4], emb_dim=2), 3, 3)
    n = sum(p.numel() for p in towers.parameters())
    monkeypatch.setattr(stacked_plan, "CPU_VMAP_MAX_MACS", 0.0)
    monkeypatch.setattr(stacked_plan, "CPU_STACK_MAX_MACS", 5 * n)  # the built-in towers: the batched-matmul limit
    assert stacked_plan.arithmetic_reason(towers, 5, torch.device("cpu")) is None
    assert "multiply-adds per run and step" in stacked_plan.arithmetic_reason(towers, 6, torch.device("cpu"))
    monkeypatch.setattr(stacked_plan, "CPU_STACK_MAX_MACS", 0.0)
    out = run_stacked(_configs(tmp_path, "stk", [["seed=0"], ["seed=1"]], ["grpo.epochs=1"]))
    assert not out.stacked and "multiply-adds per run and step" in out.notes[0], out.notes


def test_plan_sft_stacks_groups_the_sfts_of_one_world_and_structure(tmp_path):
    """A grid's SFT trainings stack when they share a world and a structure: per-seed SFTs and SFTs that differ
    in the SFT's numbers (lr, weight decay) or the head's temperature; other epochs or another world do not."""
    from v3kit.ablate.tasks import SFTTask, plan_sft_stacks
    from v3kit.config import load_config

    def task(world, *sets, split="data.split_seed=0"):
        cfg = load_config(None, ["data.synthetic.n_queries=80", split, *sets])
        return SFTTask(world, cfg, tmp_path / world / "-".join(sets) / "sft.pt", "h")

    same = [task("default", "seed=0"), task("default", "seed=1"), task("default", "sft.lr=0.01")]
    same.append(task("default", "model.sim_temperature=0.2", "sft.weight_decay=0.001"))
    other = [task("default", "sft.epochs=3"), task("default", "sft.epochs=3", "seed=4"), task("bias_1.0", "seed=0")]
    own_split = [task("default", "seed=5", split="seed=5")]  # no split_seed: the seed's own split
    stacks, alone = plan_sft_stacks([*same, *other, *own_split])
    assert [s.tasks for s in stacks] == [same, other[:2]]
    assert alone == [other[2], *own_split]
    assert plan_sft_stacks(same, "off") == ([], same)


@pytest.mark.slow
def test_a_grid_s_sfts_stacked_equal_the_sfts_trained_alone(tmp_path, monkeypatch):
    """Per-seed SFTs and a variant's own SFT train as one stack under ``stack: auto``: each SFT folder holds what
    the one-at-a-time SFT writes (``sft.pt``, its ``sft.hash``, no epoch checkpoints), its metrics equal to
    float32 rounding, and so do the grid's rows. The runs then train as one stack too, each member from its own
    SFT checkpoint (4 of them), and each run records the checkpoint it started from."""
    from v3kit.ablate import parse_grid, run_grid
    from v3kit.ablate.worker import execute_stack as runner_execute_stack
    from v3kit.ablate.worker import train_sft_stack as runner_stack

    raw = {
        "name": "g",
        "base": ["data.synthetic.n_queries=120", "data.split_seed=0", "sft.epochs=2", "rce.epochs=0", "grpo.epochs=1"],
        "seeds": [0, 1],
        "reference": "seed",
        "variants": {"seed": [], "sft_lr": ["sft.lr=0.003"]},
    }
    # what investigate's confirm grid sets: each seed's own SFT, for the run's SFT config too
    spec = dataclasses.replace(parse_grid(raw), sft_per_seed=True, retrain_sft=["seed"])
    off = run_grid(spec, tmp_path / "off", progress=False, stack="off")
    import v3kit.ablate.runner as runner

    stacked = []
    monkeypatch.setattr(runner, "train_sft", lambda task: pytest.fail("an SFT of the stack trained alone"))
    monkeypatch.setattr(runner, "train_sft_stack", lambda st: (stacked.append(len(st.tasks)), runner_stack(st))[1])
    run_stacks = []
    monkeypatch.setattr(runner, "execute_run", lambda task: pytest.fail("a run of the stack ran alone"))
    monkeypatch.setattr(runner, "execute_stack", lambda st: (run_stacks.append(st.tasks), runner_execute_stack(st))[1])
    auto = run_grid(spec, tmp_path / "auto", progress=False)
    assert stacked == [4]
    assert len(run_stacks) == 1 and len({t.sft_path for t in run_stacks[0]}) == 4
    assert auto.frame["stacked"].all() and not off.frame["stacked"].any()
    for t in run_stacks[0]:  # each run's later stages are recorded as built on its own SFT
        info = json.loads((Path(t.result_path).parent / "run_info.json").read_text())
        assert info["sft_checkpoint"] == str(t.sft_path.resolve())
    folders = sorted(p.parent.relative_to(tmp_path / "off") for p in (tmp_path / "off").rglob("sft.hash"))
    assert len(folders) == 4  # 2 variants x 2 seeds, each its own SFT
    assert folders == sorted(p.parent.relative_to(tmp_path / "auto") for p in (tmp_path / "auto").rglob("sft.hash"))
    for f in folders:
        a, b = tmp_path / "off" / f, tmp_path / "auto" / f
        assert (a / "sft.hash").read_text() == (b / "sft.hash").read_text()
        assert not list(b.glob("sft_epoch*.pt")) and (b / "sft.pt").exists()
        ma, mb = pd.read_csv(a / "metrics.csv"), pd.read_csv(b / "metrics.csv")
        assert list(ma.columns) == list(mb.columns) and len(ma) == len(mb)
        num = [c for c in ma.select_dtypes("number").columns if c not in ("epoch", "step")]
        pd.testing.assert_frame_equal(ma[num], mb[num], check_exact=False, rtol=RTOL, atol=ATOL)
    keys = ["world", "variant", "seed", "split", "stage", "epoch"]
    a, b = off.frame.sort_values(keys).reset_index(drop=True), auto.frame.sort_values(keys).reset_index(drop=True)
    metrics = [c for c in ("acc@1", "utility@1", "ndcg@5", "kl_to_sft", "selected_epoch") if c in a.columns]
    pd.testing.assert_frame_equal(a[metrics], b[metrics], check_exact=False, rtol=RTOL, atol=ATOL)


def test_an_sft_stack_keeps_the_members_that_finished_when_one_fails(tmp_path):
    """One SFT of a stack that fails (a non-finite step) is reported by name; the other SFT of the stack is
    complete (its ``sft.pt`` and the ``sft.hash`` that vouches for it) and the failed one has no hash."""
    from v3kit.ablate.tasks import SFTStackTask, SFTTask
    from v3kit.ablate.worker import train_sft_stack
    from v3kit.config import load_config

    base = ["data.synthetic.n_queries=80", "data.split_seed=0", "sft.epochs=2", "progress=false"]
    tasks = [
        SFTTask("default", load_config(None, [*base, *sets]), tmp_path / name / "sft.pt", f"hash-{name}")
        for name, sets in (("ok", []), ("bad", ["sft.lr=1e6", "sft.max_grad_norm=null", "model.sim_temperature=1e-6"]))
    ]
    with pytest.raises(RuntimeError, match="default/sft bad") as err:
        train_sft_stack(SFTStackTask(tasks))
    assert "sft ok" not in str(err.value)
    assert (tmp_path / "ok" / "sft.pt").exists() and (tmp_path / "ok" / "sft.hash").read_text() == "hash-ok"
    assert not (tmp_path / "bad" / "sft.hash").exists()
    assert not list((tmp_path / "ok").glob("sft_epoch*.pt"))


def test_a_stacked_stage_freezes_the_collector_s_old_objects_only_while_it_runs():
    """The objects alive at a stacked stage's start are out of the collector's passes while it runs, and back after
    it (also after an error); a caller's own ``gc.freeze`` is left as the caller set it."""
    import gc

    from v3kit.train.stacked import _long_lived_frozen

    assert gc.get_freeze_count() == 0
    with _long_lived_frozen():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    with pytest.raises(KeyError), _long_lived_frozen():
        raise KeyError("x")
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        with _long_lived_frozen():
            pass
        assert gc.get_freeze_count() == before  # still the caller's freeze: not undone by the stage
    finally:
        gc.unfreeze()


def test_small_shared_training_data_is_gathered_once_an_epoch(tmp_path, monkeypatch):
    """8 members of the default world (2,100 training groups of 8 x 16-d, about 10 MB in their orders, under
    EPOCH_GATHER_BYTES) get their batches as slices of one gather per epoch, not a gather per step."""
    from v3kit.train import stacked

    calls: list[int] = []
    shared_rows = stacked._StackedFit._shared_rows
    monkeypatch.setattr(
        stacked._StackedFit, "_shared_rows", lambda self, idx: calls.append(1) or shared_rows(self, idx)
    )
    epochs = ["sft.epochs=1", "rce.epochs=1", "grpo.epochs=1", "data.split_seed=0"]
    cfgs = [
        load_config(None, ["progress=false", *epochs, f"seed={s}", f"run_dir={tmp_path / str(s)}"]) for s in range(8)
    ]
    assert len(prepare_data(cfgs[0]).train) * 8 * (16 + 8 * 16 + 8) * 4 <= stacked.EPOCH_GATHER_BYTES
    out = run_stacked(cfgs)
    assert out.stacked, out.notes
    assert len(calls) == 3
