"""`v3kit investigate`'s search and confirm phases: Holm, the search space, the Optuna study (pruning, resuming,
val only) and a keep-SFT verdict that reproduces on a world where nothing helps."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY

from v3kit.ablate.stats import bootstrap_p_value, holm
from v3kit.config import ConfigError, load_config

pytest.importorskip("optuna")

from v3kit.doctor.search import Search  # noqa: E402
from v3kit.doctor.space import active, fixed_point, load_space  # noqa: E402

ALL = {"own_sft": True, "builtin_model": True, "same_dims": True, "recurring_ids": False}
BASE = [*TINY, "data.split_seed=0"]


# ---------------------------------------------------------------- statistics
def test_holm_on_a_hand_case():
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> running max 0.06)
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])  # 0.5 x 2 = 1 (capped); 0.9 x 1 < the running max
    out = holm([0.02, float("nan"), 0.04])  # NaN is left out of m
    assert np.isnan(out[1]) and np.allclose(out[[0, 2]], [0.04, 0.04])
    # Holm rejects at alpha where Bonferroni would not: 0.012 * 4 > 0.05 but 0.012 * 3 < 0.05 after 0.001 * 4
    assert (holm([0.001, 0.012, 0.3, 0.4]) < 0.05).tolist() == [True, True, False, False]


def test_bootstrap_p_value_against_the_replicates():
    x = np.array([0.1, 0.3, -0.05, 0.2, 0.15])
    rng = np.random.default_rng(0)  # the recipe of bootstrap_mean_ci (1-D)
    stats = x[rng.integers(0, 5, (2000, 5))].mean(axis=1)
    want = min(1.0, 2 * (min((stats <= 0).sum(), (stats >= 0).sum()) + 1) / 2001)
    assert bootstrap_p_value(x) == pytest.approx(want)
    assert bootstrap_p_value(np.zeros((3, 4))) == 1.0  # identical to the reference
    assert bootstrap_p_value(np.ones(4)) == pytest.approx(2 / 2001)


# ---------------------------------------------------------------- the space
def test_shipped_space_loads_and_bad_entries_are_one_line(tmp_path):
    params = load_space()
    assert {"retrain_sft", "model.residual_kind", "rce.label_weight", "grpo.kl_beta"} <= {p.name for p in params}
    assert "sft.epochs" not in {p.name for p in active(params, {**ALL, "own_sft": False})}  # an imported SFT
    for text, needle in [
        ("params: {grpo.kl_bet: {float: [0.01, 1]}}", "not a config key; did you mean 'grpo.kl_beta'?"),
        ("params: {grpo.kl_beta: {float: [1, 0.01]}}", "low < high"),
        ("params: {grpo.kl_beta: {float: [0, 1], log: true}}", "low > 0"),
        ("params: {grpo.old_policy: {choices: [sft, stale]}}", "grpo.old_policy"),
        ("params: {grpo.epochs: {int: [0, 3], if: x, needs: [gpu]}}", "needs ['gpu']"),
        ("grpo: {}", "params:"),
    ]:
        path = tmp_path / "space.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=None) as e:
            load_space(path)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_fixed_point_expresses_a_remedy():
    params = active(load_space(), ALL)
    values, extra = fixed_point(
        params, ["rce.lr=0.001", "grpo.kl_estimator=exact", "grpo.epochs=0", "select=best_val"], BASE
    )
    assert values["rce.lr"] == 0.001 and values["rce.epochs"] == 2 and values["retrain_sft"] is False
    assert "grpo.lr" not in values  # grpo.epochs=0: its parameters are not sampled
    assert extra == ["grpo.kl_estimator=exact", "select=best_val"]  # what the space cannot express
    values, extra = fixed_point(params, ["grpo.old_policy=refresh_each_epoch"], BASE)
    assert values["grpo.old_policy"] == "refresh_each_epoch" and not extra
    narrow = [p for p in params if p.key != "grpo.old_policy"]
    narrow.append(dataclasses.replace(next(p for p in params if p.key == "grpo.old_policy"), choices=("sft",)))
    values, extra = fixed_point(narrow, ["grpo.old_policy=refresh_each_epoch"], BASE)
    assert "grpo.old_policy" not in values and extra == ["grpo.old_policy=refresh_each_epoch"]  # not a listed choice
    values, _ = fixed_point(params, ["model.residual=true", "model.sim_temperature=0.1"], BASE)
    assert values["retrain_sft"] is True and values["model.residual_kind"] == "mlp" and values["sft.epochs"] == 3


# ---------------------------------------------------------------- the study
@pytest.fixture
def run_sft(tmp_path):
    from v3kit.pipeline import run_pipeline

    run_pipeline(load_config(None, [*BASE, f"run_dir={tmp_path / 'run'}"]))
    return tmp_path / "run" / "sft.pt"


def _search(tmp_path, sft, max_trials, workers=1):
    return Search(
        tmp_path / "search",
        active(load_space(), ALL),
        base=BASE,
        split_cfg=load_config(None, [*BASE, "seed=0"]),
        sft=sft,
        metric="acc@1",
        workers=workers,
        max_trials=max_trials,
    )


@pytest.mark.slow
def test_search_never_reads_the_test_split(tmp_path, run_sft, monkeypatch):
    """Every trial's pipeline gets train and val only (val in the test slot); recorded per trial."""
    import time

    import v3kit.pipeline as pipeline

    test_ids = set(pipeline.prepare_data(load_config(None, [*BASE, "seed=0"])).test.query_ids)
    seen = []
    real = pipeline.run_pipeline

    def spy(cfg, **kw):
        s = kw["splits"]
        seen.append({n: set(getattr(s, n).query_ids) for n in ("train", "val", "test")})
        return real(cfg, **kw)

    monkeypatch.setattr(pipeline, "run_pipeline", spy)
    search = _search(tmp_path, run_sft, max_trials=4)
    search.enqueue([("run", []), ("residual", ["model.residual=true", "model.sim_temperature=0.1"])])
    res = search.run(time.time() + 300)
    assert res.counts["complete"] + res.counts["pruned"] == len(seen) == 4
    for touched in seen:
        assert not (touched["train"] | touched["val"] | touched["test"]) & test_ids
        assert touched["test"] == touched["val"]


@pytest.mark.slow
def test_pruner_stops_a_deterministically_bad_trial_early(tmp_path, run_sft):
    """Five trials that keep at least SFT's val score, then one whose new SFT starts from random weights at an lr
    too small to leave them (30 epochs planned): the median pruner stops it at its first step past the warm-up."""
    import time

    import optuna

    search = _search(tmp_path, run_sft, max_trials=6)
    good = [(f"good{k}", ["rce.epochs=6", "grpo.epochs=0", f"rce.lr={1e-5 * (k + 1)}"]) for k in range(5)]
    bad = ("bad", ["model.hidden=[8]", "sft.lr=0.0001", "sft.epochs=30", "rce.epochs=0", "grpo.epochs=0"])
    search.enqueue([*good, bad])
    search.run(time.time() + 300)
    trials = {t.user_attrs["name"]: t for t in search.study.get_trials(deepcopy=False)}
    assert all(trials[n].state == optuna.trial.TrialState.COMPLETE for n, _ in good)
    t = trials["bad"]
    assert t.state == optuna.trial.TrialState.PRUNED
    assert max(t.intermediate_values) == 2  # reported steps 0, 1, 2 (the warm-up) of its 31, then stopped
    assert len(list((tmp_path / "search" / f"trial{t.number}").glob("metrics.csv"))) == 1


KILLED = """
import sys, time
sys.path.insert(0, {tests!r})
from test_search import _search
from pathlib import Path
s = _search(Path({tmp!r}), Path({sft!r}), max_trials=3)
s.enqueue([("a", ["rce.epochs=1", "grpo.epochs=0"]), ("b", ["rce.epochs=1", "grpo.epochs=1"]),
           ("c", ["rce.epochs=3", "grpo.epochs=0"])])
s.run(time.time() + 300)
"""


@pytest.mark.slow
def test_a_killed_search_resumes_without_redoing_finished_trials(tmp_path, run_sft):
    """SIGKILL in the third trial's RCE; the rerun keeps the two finished trials (values, files untouched), marks
    the killed one failed, runs it again and goes on to its trial cap."""
    import time

    import optuna

    code = KILLED.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), sft=str(run_sft))
    env = {
        **os.environ,
        "V3KIT_TEST_KILL_AT": "rce:epoch2:before_checkpoint",
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
    }
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    S = optuna.trial.TrialState
    search = _search(tmp_path, run_sft, max_trials=4)
    before = {t.number: t for t in search.study.get_trials(deepcopy=False)}
    assert [before[n].state for n in (0, 1, 2)] == [S.COMPLETE, S.COMPLETE, S.RUNNING]
    stamps = {n: (tmp_path / "search" / f"trial{n}" / "metrics.csv").stat().st_mtime_ns for n in (0, 1)}
    search.enqueue([("a", []), ("b", []), ("c", [])])  # already in the study: not enqueued again
    search.run(time.time() + 300)
    after = {t.number: t for t in search.study.get_trials(deepcopy=False)}
    for n in (0, 1):
        assert after[n].state == S.COMPLETE and after[n].value == before[n].value
        assert (tmp_path / "search" / f"trial{n}" / "metrics.csv").stat().st_mtime_ns == stamps[n]
    assert after[2].state == S.FAIL
    redo = [t for t in after.values() if t.user_attrs.get("name") == "c" and t.number != 2]
    assert len(redo) == 1 and redo[0].state == S.COMPLETE and redo[0].params == before[2].params
    assert len(after) == 4 and sum(t.state == S.COMPLETE for t in after.values()) == 3  # the cap (4) counts
    # every finished trial, the killed one's failure included
    assert sum(t.user_attrs.get("name") == "a" for t in after.values()) == 1


# ---------------------------------------------------------------- a world where nothing helps
NOTHING = [
    "progress=false",
    "data.synthetic.n_queries=400",
    "data.synthetic.label_noise=100.0",  # the human's label is noise: no model beats any other on acc@1
    "data.test_frac=0.3",
    "sft.epochs=3",
    "rce.epochs=1",
    "grpo.epochs=1",
]


@pytest.mark.slow
def test_keep_sft_reproduces_on_a_world_where_nothing_helps(tmp_path):
    """Labels that are pure noise: the verdict keeps SFT, and retraining its config (the run's SFT) with fresh
    seeds lands inside the interval, whose width holds the SFT's seed noise."""
    from v3kit.doctor.investigate import investigate, reproduce
    from v3kit.pipeline import run_pipeline

    run_pipeline(load_config(None, [*NOTHING, f"run_dir={tmp_path / 'run'}"]))
    v = investigate(
        tmp_path / "run",
        metric="acc@1",
        out=tmp_path / "out",
        budget_minutes=5,
        max_trials=6,
        top_k=2,
        confirm_seeds=3,
        progress=False,
    )
    assert v.recommendation == "keep_sft"
    assert v.effect_vs_sft[1] < v.effect_vs_sft[2]  # the retrained SFT's spread, not [0, 0]
    data = json.loads((tmp_path / "out" / "verdict.json").read_text())
    assert data["search"]["trials"] == 6 and len(data["seed_effects"]) == 3
    text = (tmp_path / "out" / "verdict.md").read_text()
    assert text.splitlines()[2].startswith("Keep the SFT you have") and "Holm" in text
    rep = reproduce(tmp_path / "out", [1000, 1001])
    assert rep["inside"], rep
    assert len(set(rep["effects"])) == 2  # two fresh SFTs, not the same model twice


# ---------------------------------------------------------------- the confirm phase's decision
def _confirm_frames(effects: dict[str, float], seeds=(100, 101, 102), n_q: int = 60):
    """A confirm grid's frames by hand: per query, acc@1 of SFT is a fixed 0/1 pattern and each candidate flips
    the given share of SFT's misses to hits (its effect), differently per seed."""
    import pandas as pd

    rng = np.random.default_rng(0)
    base = (rng.random(n_q) < 0.4).astype(float)
    rows, pq = [], []
    for name, eff in {"sft_only": 0.0, **effects}.items():
        for s in seeds:
            acc = base.copy()
            misses = np.flatnonzero(acc == 0)
            flip = rng.choice(misses, int(round(eff * n_q)), replace=False) if eff > 0 else []
            acc[flip] = 1.0
            rows.append(
                {
                    "world": "default",
                    "variant": name,
                    "seed": s,
                    "split": "test",
                    "stage": "selected",
                    "epoch": 0,
                    "acc@1": acc.mean(),
                    "selected_stage": "sft" if eff == 0 else "rce",
                }
            )
            for stage in ("selected", "sft"):
                pq.append(
                    pd.DataFrame(
                        {
                            "world": "default",
                            "variant": name,
                            "seed": s,
                            "stage": stage,
                            "query": np.arange(n_q),
                            "acc@1": acc if stage == "selected" else base,
                        }
                    )
                )
    return pd.DataFrame(rows), pd.concat(pq, ignore_index=True)


def test_confirm_weighs_with_holm_and_ships_only_what_survives_it():
    from v3kit.doctor.confirm import Candidate, choose, weigh

    frame, pq = _confirm_frames({"big": 0.2, "small": 0.03, "run": 0.0})
    cands = [
        Candidate("run", [], "reference", "the run"),
        Candidate("sft_only", [], "reference", "SFT", shippable=False),
        Candidate("big", ["rce.lr=0.001"], "finalist", "big"),
        Candidate("small", ["rce.lr=0.0001"], "finalist", "small"),
    ]
    t = weigh(frame, pq, "acc@1", cands).set_index("variant")
    family = t[t["shippable"]]
    np.testing.assert_allclose(family["p_holm"], holm(family["p"].to_numpy()))  # one family of 3 comparisons
    assert t.loc["big", "verdict"] == "better" and t.loc["big", "vs_sft"] == pytest.approx(0.2, abs=1e-9)
    assert t.loc["run", "kept_sft"] == 3 and t.loc["big", "kept_sft"] == 0
    assert choose(t.reset_index(), "acc@1") == "big"
    assert len(t.loc["big", "seed_effects"]) == 3
    # without "big", nothing survives the correction: keep SFT
    frame2, pq2 = _confirm_frames({"small": 0.0167, "run": 0.0})
    t2 = weigh(frame2, pq2, "acc@1", [c for c in cands if c.name != "big"])
    assert choose(t2, "acc@1") is None


def test_confirm_seconds_reads_the_finalists_own_run_times():
    from v3kit.doctor.search import ConfirmPlan, confirm_seconds

    trials = [
        {"name": "run", "state": "complete", "value": 0.30, "run_s": 10.0},
        {"name": "a", "state": "complete", "value": 0.50, "run_s": 40.0},
        {"name": "b", "state": "complete", "value": 0.40, "run_s": 20.0},
        {"name": "c", "state": "pruned", "value": None, "run_s": 1.0},
    ]
    # top 2 = a (40 s) and b (20 s); the run 10 s, twice with the run's SFT retrained; 3 seeds; 2 workers; +20%
    assert confirm_seconds(trials, "acc@1", ConfirmPlan(2, 3, True), 2) == pytest.approx(1.2 * (60 + 20) * 3 / 2)
    assert confirm_seconds(trials, "regret@1", ConfirmPlan(1, 2, False), 1) == pytest.approx(1.2 * (10 + 10) * 2)
    assert confirm_seconds(trials[3:], "acc@1", ConfirmPlan(3, 3, True), 1) == 0.0


def test_source_of_gain_names_the_stage_most_seeds_shipped_and_an_own_sft():
    import pandas as pd

    from v3kit.doctor.confirm import SHIPPED, source_of_gain

    def frame(stages):
        return pd.DataFrame(
            {"variant": "v", "split": "test", "stage": SHIPPED, "seed": range(len(stages)), "selected_stage": stages}
        )

    # 2 of 3 seeds shipped GRPO: from the SFT you have, GRPO is the gain; with its own SFT, the head is part of it
    assert source_of_gain(frame(["grpo", "grpo", "sft"]), "v", own_sft=False) == "the gain comes from GRPO"
    own = source_of_gain(frame(["grpo", "grpo", "sft"]), "v", own_sft=True)
    assert own.startswith("the gain comes from its own SFT model") and own.endswith("with GRPO on top of it")
    assert "RCE warm-up" in source_of_gain(frame(["rce", "rce", "grpo"]), "v", own_sft=False)
    assert "SFT model itself" in source_of_gain(frame(["sft", "sft", "grpo"]), "v", own_sft=True)
    assert source_of_gain(frame(["sft", "sft", "grpo"]), "v", own_sft=False) == ""


def test_finalists_are_distinct_configs_whatever_the_overrides_spelling():
    """Two trials that train the same config (an enqueued variant repeats ``select=best_val``; a value spelled
    ``1e-05`` or ``0.00001``; another order) are one finalist: the next distinct trial takes the second place."""
    from v3kit.doctor.search import SearchResult, config_key, finalists

    base = ["model.residual=true", "sft.lr=0.001", "select=best_val"]
    trials = [
        {"number": 0, "state": "complete", "value": 0.6, "own_sft": True, "overrides": [*base, "grpo.lr=1e-05"]},
        {  # the same config as trial 0: repeats, another spelling and order
            "number": 1,
            "state": "complete",
            "value": 0.6,
            "own_sft": True,
            "overrides": ["grpo.lr=0.00001", *reversed(base), "select=best_val"],
        },
        {"number": 2, "state": "complete", "value": 0.5, "own_sft": True, "overrides": [*base, "grpo.lr=2e-05"]},
        {"number": 3, "state": "complete", "value": 0.7, "own_sft": False, "overrides": [*base, "grpo.lr=1e-05"]},
        {"number": 4, "state": "pruned", "value": None, "own_sft": True, "overrides": []},
    ]
    assert config_key(trials[0]["overrides"]) == config_key(trials[1]["overrides"])
    assert config_key(["grpo.lr=1e-05", "grpo.lr=2e-05"]) == config_key(["grpo.lr=2e-05"])  # the last value wins
    assert config_key(["grpo.lr=1e-05"]) != config_key(["grpo.lr=2e-05"])
    result = SearchResult(trials=trials, counts={}, wall_s=0.0)
    assert [t["number"] for t in finalists(result, "acc@1", 3)] == [3, 0, 2]  # not the run's SFT: another config
    assert [t["number"] for t in finalists(result, "acc@1", 2)] == [3, 0]


def test_a_variant_that_trains_an_earlier_ones_config_shares_its_trial(tmp_path):
    """The doctor's switch to a residual head and the ``residual_pipeline`` remedy train one config (the remedy
    also says ``select=best_val``, which every trial gets): one trial is enqueued, the switch is its alias, kept in
    the study (a resumed search enqueues nothing again, and a later variant can alias a waiting trial), and the
    causes table reads the shared trial's score under the switch's name."""
    from types import SimpleNamespace

    from v3kit.doctor.confirm import causes_from_search
    from v3kit.doctor.search import ALIASES, SearchResult

    pipeline = ("pipeline", ["model.residual=true", "model.sim_temperature=0.1", "select=best_val"])
    switch = ("switch", ["model.sim_temperature=0.1", "model.residual=true"])
    other = ("other", ["grpo.lr=0.0003"])
    search = _search(tmp_path, tmp_path / "sft.pt", max_trials=4)
    assert search.enqueue([pipeline, switch, other]) == 2
    waiting = [t.user_attrs["name"] for t in search.study.get_trials(deepcopy=False)]
    assert waiting == ["pipeline", "other"] and search.study.user_attrs[ALIASES] == {"switch": "pipeline"}
    again = _search(tmp_path, tmp_path / "sft.pt", max_trials=4)  # the same study, as a resumed search opens it
    assert again.enqueue([pipeline, switch, other]) == 0
    assert again.enqueue([("other_spelled", ["grpo.lr=3.0e-4"]), ("new", ["grpo.lr=0.0004"])]) == 1
    assert again.study.user_attrs[ALIASES] == {"switch": "pipeline", "other_spelled": "other"}
    assert again.result().aliases == {"switch": "pipeline", "other_spelled": "other"}

    findings = [SimpleNamespace(check="baselines", triggered=True, message="m")]
    variants = [SimpleNamespace(name="switch", check="baselines")]
    trials = [{"name": "run", "best": 0.5}, {"name": "pipeline", "best": 0.75}]
    shared = SearchResult(trials=trials, counts={}, wall_s=0.0, aliases={"switch": "pipeline"})
    (cause,) = causes_from_search(findings, variants, shared, 1)
    assert cause["remedy"] == "switch" and cause["val_vs_run"] == pytest.approx(0.25)
    alone = SearchResult(trials=trials, counts={}, wall_s=0.0)  # without the alias the switch has no score
    (untried,) = causes_from_search(findings, variants, alone, 1)
    assert untried["remedy"] is None and untried["val_vs_run"] is None
