"""`v3kit investigate`'s search run as stacks (``--stack auto``, :mod:`v3kit.doctor.search_stacked`): a stacked
trial gets the value and the val reports its run alone gets, the median pruner stops members inside a stack (in
SFT and in RCE), the trial cap holds, a killed stack resumes without touching finished trials, and ``--stack off``
runs every trial alone."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY

from v3kit.config import load_config

optuna = pytest.importorskip("optuna")

import v3kit.doctor.search_stacked as search_stacked  # noqa: E402
from v3kit.doctor.search import Search  # noqa: E402
from v3kit.doctor.search_stacked import StackedSearch, structural  # noqa: E402
from v3kit.doctor.space import active, load_space  # noqa: E402

ALL = {"own_sft": True, "builtin_model": True, "same_dims": True, "recurring_ids": False}
BASE = [*TINY, "data.split_seed=0"]
S = optuna.trial.TrialState


@pytest.fixture
def run_sft(tmp_path):
    from v3kit.pipeline import run_pipeline

    run_pipeline(load_config(None, [*BASE, f"run_dir={tmp_path / 'run'}"]))
    return tmp_path / "run" / "sft.pt"


def _search(folder, sft, max_trials, kind=StackedSearch):
    return kind(
        Path(folder),
        active(load_space(), ALL),
        base=BASE,
        split_cfg=load_config(None, [*BASE, "seed=0"]),
        sft=sft,
        metric="acc@1",
        max_trials=max_trials,
    )


def _by_name(search):
    return {t.user_attrs["name"]: t for t in search.study.get_trials(deepcopy=False) if "name" in t.user_attrs}


# one structure on the run's SFT (numbers differ: RCE's and GRPO's lr, kl_beta, label_weight, the temperatures),
# and one that trains its own SFT (its lr and the head's temperature differ); five trials: the median pruner
# (which waits for five finished trials) stops none of them, stacked or not
SHARED = [
    ("run", []),
    ("rce_lr", ["rce.lr=0.001", "rce.label_weight=0.5", "rce.t_start=3.0", "rce.t_end=0.3"]),
    ("grpo", ["grpo.lr=0.0003", "grpo.kl_beta=0.3"]),
]
OWN = [
    ("own_a", ["sft.lr=0.003", "model.sim_temperature=0.2"]),
    ("own_b", ["sft.lr=0.0005", "model.sim_temperature=0.07"]),
]


@pytest.mark.slow
def test_stacked_trials_match_the_same_trials_run_alone(tmp_path, run_sft, monkeypatch):
    """Five enqueued trials in two structures: stacked (a stack of 3 on the run's SFT, a stack of 2 with their own
    SFT) and one at a time give each trial the same value, the same val reports and the same selected epoch; no
    stack sees the test split."""
    seen = []
    real = search_stacked.run_stacked

    def spy(cfgs, **kw):
        seen.append((len(cfgs), kw["splits"]))
        return real(cfgs, **kw)

    monkeypatch.setattr(search_stacked, "run_stacked", spy)
    alone = _search(tmp_path / "alone", run_sft, 5, kind=Search)
    stacked = _search(tmp_path / "stacked", run_sft, 5)
    for s in (alone, stacked):
        s.enqueue([*SHARED, *OWN])
        s.run(time.time() + 600)
    assert sorted(n for n, _ in seen) == [2, 3]
    for _, splits in seen:
        assert splits.test is splits.val  # the test split never enters a trial
    a, b = _by_name(alone), _by_name(stacked)
    rows = {r["name"]: r for r in stacked.result().trials}
    for name, _ in [*SHARED, *OWN]:
        assert a[name].state == b[name].state == S.COMPLETE
        assert b[name].value == pytest.approx(a[name].value, abs=1e-6), name
        assert b[name].user_attrs["selected"] == a[name].user_attrs["selected"], name
        assert list(b[name].intermediate_values) == list(a[name].intermediate_values)
        for step, v in a[name].intermediate_values.items():
            assert b[name].intermediate_values[step] == pytest.approx(v, abs=1e-6), (name, step)
        assert b[name].user_attrs["own_sft"] == a[name].user_attrs["own_sft"]
        assert rows[name]["stacked"] and rows[name]["stack"] == (2 if name.startswith("own") else 3)
    assert not any(r["stacked"] for r in alone.result().trials)


def _finished_trials(study, n, value=1.0, steps=range(60)):
    """``n`` complete trials whose val score was ``value`` at every one of ``steps`` (by default at every step: the
    median any real trial falls below)."""
    for _ in range(n):
        study.add_trial(
            optuna.trial.create_trial(
                state=S.COMPLETE,
                value=value,
                params={},
                distributions={},
                intermediate_values=dict.fromkeys(steps, value),
            )
        )


@pytest.mark.parametrize(
    ("variants", "stage"),
    [
        ([(f"r{k}", ["rce.epochs=6", "grpo.epochs=0", f"rce.lr={1e-4 * (k + 1)}"]) for k in range(3)], "rce"),
        ([(f"s{k}", ["sft.epochs=12", f"sft.lr={1e-3 * (k + 1)}"]) for k in range(2)], "sft"),
    ],
)
def test_the_pruner_stops_members_inside_a_stack(tmp_path, run_sft, variants, stage):
    """Five finished trials that scored 1.0 at every step: a stack of trials (on the run's SFT in RCE, or training
    its own SFT) is stopped at its first step past the warm-up, as each would be alone, and trains no later
    epoch."""
    search = _search(tmp_path / "search", run_sft, 5 + len(variants))
    _finished_trials(search.study, 5)
    search.enqueue(variants)
    search.run(time.time() + 600)
    trials = _by_name(search)
    for name, _ in variants:
        t = trials[name]
        assert t.state == S.PRUNED and t.user_attrs["stacked"] and t.user_attrs["stack"] == len(variants)
        assert max(t.intermediate_values) == 2  # reported steps 0, 1, 2 (the warm-up), then stopped
        metrics = (tmp_path / "search" / f"trial{t.number}" / "metrics.csv").read_text()
        epochs = {int(line.split(",")[2]) for line in metrics.splitlines()[1:] if line.startswith(f"{stage},val")}
        assert epochs == {0, 1, 2}, epochs  # epoch 2's end is where the stack stopped it
        assert "grpo,val" not in metrics  # a member pruned in one stage trains no later stage


def test_the_members_of_a_stack_prune_each_other(tmp_path, run_sft):
    """Five finished trials that report nothing past step 1: from step 2 on, a stack member competes with its peers
    only. Each member is pruned at exactly the first step where its running best is below the median of the values
    its live peers reported at that step (recomputed here from the reports), and reports nothing after it; the
    others finish."""
    variants = [
        (f"r{k}", ["rce.epochs=6", "grpo.epochs=0", f"rce.lr={lr}"]) for k, lr in enumerate((1e-5, 3e-3, 3e-2, 0.3))
    ]
    search = _search(tmp_path / "search", run_sft, 5 + len(variants))
    _finished_trials(search.study, 5, value=0.0, steps=(0, 1))
    search.enqueue(variants)
    search.run(time.time() + 600)
    trials = {name: t for name, t in _by_name(search).items()}
    reports = {name: dict(t.intermediate_values) for name, t in trials.items()}
    last = max(max(r) for r in reports.values())  # the evaluations of a trial that is never stopped
    pruned_at: dict[str, int] = {}
    for step in range(2, last + 1):
        live = [n for n in reports if n not in pruned_at and step in reports[n]]
        for n in live:
            peers = [reports[p][step] for p in live if p != n]
            if peers and reports[n][step] < statistics.median(peers):
                pruned_at[n] = step
    assert pruned_at and len(pruned_at) < len(variants)  # the peers decided something, not everything
    for name, t in trials.items():
        if name in pruned_at:
            assert t.state == S.PRUNED and max(reports[name]) == pruned_at[name], name
        else:
            assert t.state == S.COMPLETE and max(reports[name]) == last, name


def test_stacks_sample_numbers_around_one_structure_and_keep_the_cap(tmp_path, run_sft):
    """No enqueued variant: the first stack is a sampled trial and 4 more that share its choices and integers
    (enqueued with those fixed) and sample their own floats; the cap (5) ends the search there."""
    search = _search(tmp_path / "search", run_sft, 5)
    res = search.run(time.time() + 600)
    trials = search.study.get_trials(deepcopy=False)
    assert len(trials) == 5 and res.counts["complete"] + res.counts["pruned"] == 5
    names = structural(search.params)
    lead = trials[0]
    floats = [n for n in lead.params if n not in names]
    assert floats, "the sampled trial has numbers to vary"
    for t in trials[1:]:
        assert t.user_attrs["stack_of"] == lead.number
        assert {n: t.params[n] for n in names & set(t.params)} == {n: lead.params[n] for n in names & set(lead.params)}
        assert set(t.params) == set(lead.params)
        assert any(t.params[n] != lead.params[n] for n in floats)
    assert all(r["stacked"] and r["stack"] == 5 for r in res.trials)


KILLED = """
import sys, time
sys.path.insert(0, {tests!r})
from test_search_stacked import _search
from pathlib import Path
s = _search(Path({tmp!r}) / "search", Path({sft!r}), max_trials=4)
s.enqueue([("a", ["rce.epochs=1", "grpo.epochs=0"]), ("b", ["rce.epochs=1", "grpo.epochs=1"]),
           ("c", ["rce.epochs=3", "grpo.epochs=0", "rce.lr=0.001"]), ("d", ["rce.epochs=3", "grpo.epochs=0"])])
s.run(time.time() + 600)
"""


@pytest.mark.slow
def test_a_killed_stack_resumes_without_redoing_finished_trials(tmp_path, run_sft):
    """SIGKILL inside a stack (c and d, in RCE): the rerun keeps the two finished trials (values, files untouched),
    marks the killed stack's trials failed, runs them again as a stack and stops at the cap."""
    code = KILLED.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), sft=str(run_sft))
    env = {
        **os.environ,
        "V3KIT_TEST_KILL_AT": "rce:epoch2:before_checkpoint",
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
    }
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    search = _search(tmp_path / "search", run_sft, max_trials=6)
    before = {t.number: t for t in search.study.get_trials(deepcopy=False)}
    assert [before[n].state for n in (0, 1, 2, 3)] == [S.COMPLETE, S.COMPLETE, S.RUNNING, S.RUNNING]
    stamps = {n: (tmp_path / "search" / f"trial{n}" / "metrics.csv").stat().st_mtime_ns for n in (0, 1)}
    search.enqueue([("a", []), ("b", []), ("c", []), ("d", [])])  # already in the study: not enqueued again
    search.run(time.time() + 600)
    after = {t.number: t for t in search.study.get_trials(deepcopy=False)}
    for n in (0, 1):
        assert after[n].state == S.COMPLETE and after[n].value == before[n].value
        assert (tmp_path / "search" / f"trial{n}" / "metrics.csv").stat().st_mtime_ns == stamps[n]
    assert after[2].state == after[3].state == S.FAIL
    for n, name in ((2, "c"), (3, "d")):
        redo = [t for t in after.values() if t.user_attrs.get("name") == name and t.number != n]
        assert len(redo) == 1 and redo[0].state == S.COMPLETE and redo[0].params == before[n].params
        assert redo[0].user_attrs["stacked"] and redo[0].user_attrs["stack"] == 2
    assert len(after) == 6  # the cap counts the killed stack's failures


def test_stack_off_runs_every_trial_alone(tmp_path, run_sft, monkeypatch):
    """``--stack off`` (:class:`Search`) never builds a stack: each trial is one run_pipeline, as before."""

    def refuse(*a, **kw):
        raise AssertionError("--stack off must not stack")

    monkeypatch.setattr(search_stacked, "run_stacked", refuse)
    search = _search(tmp_path / "search", run_sft, 3, kind=Search)
    search.enqueue(SHARED[:3])
    res = search.run(time.time() + 600)
    assert res.counts["complete"] == 3 and not any(r["stacked"] for r in res.trials)
    assert all(r["stack"] == 1 for r in res.trials)


def test_a_structure_the_stack_cannot_batch_runs_its_trials_alone(tmp_path, run_sft, monkeypatch):
    """When the stacked trainer would not batch a structure (``choose_stack`` gives a reason), its trials run alone
    as with ``--stack off`` (pruned by raising, as before), each recorded with the reason, and a sampled trial of
    it gets no copies: TPE samples the next trials freely."""

    def refuse(*a, **kw):
        raise AssertionError("an unbatchable structure must not go through run_stacked")

    monkeypatch.setattr(
        search_stacked, "choose_stack", lambda models, q, c: (None, "the towers are not the built-in MLP")
    )
    monkeypatch.setattr(search_stacked, "run_stacked", refuse)
    search = _search(tmp_path / "search", run_sft, 4)
    search.enqueue(SHARED[:2])  # one structure: a stack of 2 if it could batch
    res = search.run(time.time() + 600)
    assert res.counts["complete"] + res.counts["pruned"] == 4
    trials = search.study.get_trials(deepcopy=False)
    for t in trials:
        assert t.user_attrs["stacked"] is False and t.user_attrs["stack"] == 1
        assert "stack_of" not in t.user_attrs  # no enqueued copies of a sampled trial
    assert [t.user_attrs.get("stack_note") for t in trials[:2]] == ["the towers are not the built-in MLP"] * 2


def test_a_structure_whose_arithmetic_a_stack_cannot_save_runs_alone_on_a_cpu(tmp_path, run_sft, monkeypatch):
    """On a CPU a stack saves each operation's fixed cost, not arithmetic: a structure over the search's limit of
    multiply-adds per run and step runs its trials alone, with the reason recorded."""
    from v3kit.train import stacked_plan

    monkeypatch.setattr(stacked_plan, "SEARCH_STACK_MAX_MACS", 0.0)
    monkeypatch.setattr(stacked_plan, "SEARCH_COST_RATIO", 0.0)
    monkeypatch.setattr(search_stacked, "run_stacked", lambda *a, **kw: pytest.fail("must not stack"))
    search = _search(tmp_path / "search", run_sft, 2)
    search.enqueue(SHARED[:2])
    search.run(time.time() + 600)
    notes = [t.user_attrs.get("stack_note", "") for t in search.study.get_trials(deepcopy=False)]
    assert len(notes) == 2 and all("multiply-adds per run and step" in n for n in notes), notes


def test_the_search_limit_is_its_floor_or_a_multiple_of_the_cheapest_structure(tmp_path, run_sft, monkeypatch):
    """``search_limit`` is SEARCH_STACK_MAX_MACS, or SEARCH_COST_RATIO times the cheapest structure of the space
    (here the run's SFT towers; a residual model costs more) where that is more; a structure stacks in the search
    when its multiply-adds are within it and within its grid limit, computed by hand here."""
    from v3kit.train import stacked_plan
    from v3kit.train.checkpoint import load_checkpoint, model_from_checkpoint
    from v3kit.train.model import build_model

    task = _search(tmp_path / "probe", run_sft, 4).task()
    structures = search_stacked.space_structures(task)
    macs = {}
    for own, cfg in structures:
        s = search_stacked.probe(task, own, cfg)
        assert s.cpu and s.model_reason is None and s.grid_limit == stacked_plan.CPU_STACK_MAX_MACS
        # by hand: the largest training batch's candidates (64 groups of 8, no candidate table in the synthetic
        # world) times the trainable parameters of the model a trial of this structure trains
        model = build_model(cfg.model, 16, 16) if own else model_from_checkpoint(load_checkpoint(run_sft), run_sft)
        assert s.macs == 64 * 8 * sum(p.numel() for p in model.parameters())
        macs[(own, cfg.model.residual, cfg.model.residual_kind if cfg.model.residual else None)] = s.macs
    cheapest, dearest = min(macs.values()), max(macs.values())
    assert dearest > cheapest  # the residual models cost more than the plain towers
    own, cfg = next((o, c) for o, c in structures if search_stacked.probe(task, o, c).macs == dearest)

    def fresh(name, floor, ratio):
        monkeypatch.setattr(stacked_plan, "SEARCH_STACK_MAX_MACS", floor)
        monkeypatch.setattr(stacked_plan, "SEARCH_COST_RATIO", ratio)
        return _search(tmp_path / name, run_sft, 4).task()

    t = fresh("floor", 10 * dearest, 2.0)  # the floor is more than twice the cheapest: it is the limit
    assert search_stacked.search_limit(t) == 10 * dearest and search_stacked.structure_reason(t, own, cfg) is None
    ratio = dearest / cheapest
    t = fresh("ratio_in", 0.0, ratio)  # the dearest structure is exactly the multiple: it stacks
    assert search_stacked.search_limit(t) == pytest.approx(dearest)
    assert search_stacked.structure_reason(t, own, cfg) is None
    t = fresh("ratio_out", 0.0, ratio * 0.99)  # just under: it runs alone, the note names the limit
    note = search_stacked.structure_reason(t, own, cfg)
    assert note is not None and f"over the {ratio * 0.99 * cheapest / 1e6:.0f} M limit" in note
    monkeypatch.setattr(stacked_plan, "CPU_STACK_MAX_MACS", dearest * 0.5)  # never over the grid's own limit
    t = fresh("grid", 0.0, 10 * ratio)
    assert search_stacked.structure_reason(t, own, cfg) is not None
    monkeypatch.setattr(search_stacked, "MAX_PROBED_STRUCTURES", 1)  # too many to probe: the floor alone
    assert search_stacked.search_limit(fresh("many", 123.0, 10 * ratio)) == 123.0


def test_nothing_stacks_names_why_when_no_structure_of_the_space_would_stack(tmp_path, run_sft, monkeypatch):
    """``nothing_stacks`` reads every structure the space can give a trial (retrain_sft x the model's switches):
    all refused gives one reason naming how many; one structure that would stack gives None."""
    from v3kit.train import stacked_plan

    task = _search(tmp_path / "small", run_sft, 4).task()
    assert search_stacked.nothing_stacks(task) is None  # TINY's towers stack on a CPU
    monkeypatch.setattr(stacked_plan, "SEARCH_STACK_MAX_MACS", 0.0)
    monkeypatch.setattr(stacked_plan, "SEARCH_COST_RATIO", 0.0)
    note = search_stacked.nothing_stacks(_search(tmp_path / "none", run_sft, 4).task())
    assert note is not None and "multiply-adds per run and step" in note
    # the run's SFT, and a retrained SFT with normalize (2) x residual off or on with either residual_kind (3)
    assert "(7 structures;" in note, note
    seen = []

    def only_residual(task, own_sft, cfg):  # one structure (a retrained residual model) would stack
        seen.append((own_sft, cfg.model.residual))
        return None if own_sft and cfg.model.residual else "refused"

    monkeypatch.setattr(search_stacked, "structure_reason", only_residual)
    assert search_stacked.nothing_stacks(_search(tmp_path / "one", run_sft, 4).task()) is None
    assert (True, True) in seen and (False, False) in seen  # both the run's SFT and a retrained model were read
    monkeypatch.setattr(search_stacked, "structure_reason", lambda task, own_sft, cfg: "refused")
    assert search_stacked.nothing_stacks(_search(tmp_path / "all", run_sft, 4).task()) is not None
    monkeypatch.setattr(search_stacked, "MAX_PROBED_STRUCTURES", 4)  # too many to read: the stacked search decides
    assert search_stacked.nothing_stacks(_search(tmp_path / "many", run_sft, 4).task()) is None


def test_stack_auto_runs_the_one_at_a_time_search_when_nothing_would_stack(tmp_path, run_sft, monkeypatch):
    """``investigate --stack auto`` where no structure would stack runs :class:`Search` itself (the path and
    trials of ``--stack off``) and says why in the verdict's search summary."""
    from v3kit.doctor.investigate import Investigation
    from v3kit.train import stacked_plan

    monkeypatch.setattr(stacked_plan, "SEARCH_STACK_MAX_MACS", 0.0)
    monkeypatch.setattr(stacked_plan, "SEARCH_COST_RATIO", 0.0)
    monkeypatch.setattr(search_stacked, "run_stacked", lambda *a, **kw: pytest.fail("must not stack"))
    used = []
    real_run = Search.run

    def run(self, *a, **kw):
        used.append(type(self))
        return real_run(self, *a, **kw)

    monkeypatch.setattr(Search, "run", run)
    inv = Investigation(run_sft.parent, metric="acc@1", out=tmp_path / "inv", max_trials=2, progress=False)
    inv.search(time.time() + 600)
    assert used == [Search]
    assert inv.stack_note is not None and "multiply-adds" in inv.stack_note
    assert not any("stacked" in t.user_attrs for t in inv.search_result.study.get_trials(deepcopy=False))
