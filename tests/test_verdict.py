"""From a run to a verdict: model.residual, select, grid variants of model.*/sft.*, and `v3kit investigate`."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import tiny_config

from v3kit.ablate.grid import parse_grid
from v3kit.ablate.runner import run_grid
from v3kit.config import ConfigError, load_config
from v3kit.train.model import ModelConfig, TwoTower, build_model
from v3kit.train.selection import choose, select_model, val_scores

# ---------------------------------------------------------------- model.residual


def test_untrained_residual_towers_are_the_raw_cosine_ranker():
    torch.manual_seed(0)
    model = build_model(ModelConfig(residual=True, hidden=[16]), 8, 8)
    q, c = torch.randn(5, 8), torch.randn(5, 4, 8)
    got = torch.einsum("bd,bgd->bg", model.encode_query(q), model.encode_candidates(c))
    qn, cn = q / q.norm(dim=-1, keepdim=True), c / c.norm(dim=-1, keepdim=True)
    want = (qn.unsqueeze(1) * cn).sum(-1)  # cosine by hand
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # it learns: the zero-initialised last layer gets a gradient (the hidden layers get theirs once it moves)
    got.sum().backward()
    assert model.query_tower.f[-1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="model.residual needs query and candidate features of one dim"):
        TwoTower(8, 6, residual=True)
    with pytest.raises(ValueError, match="built-in"):
        build_model(ModelConfig(target="tests/custom_models.py:BilinearRanker", residual=True), 8, 8)


# ---------------------------------------------------------------- select


def test_choose_by_hand():
    scores = [("sft", 5, 0.30), ("rce", 1, 0.32), ("rce", 2, 0.32), ("grpo", 1, 0.31)]
    assert choose(scores, "acc@1", "best_val", "grpo") == ("rce", 1, 0.32)  # a tie keeps the earlier
    assert choose(scores, "acc@1", "last", "grpo") == ("grpo", 1, 0.31)
    assert choose(scores, "acc@1", "last", "rce") == ("rce", 2, 0.32)
    assert choose(scores[:1], "acc@1", "last", "grpo") == ("sft", 5, 0.30)
    assert choose([("sft", 0, 0.5), ("grpo", 1, 0.4)], "regret@1", "best_val", "grpo")[0] == "grpo"  # minimised
    assert choose([("sft", 0, 0.5), ("grpo", 1, 0.4)], "acc@1", "best_val", "grpo")[0] == "sft"


def test_val_scores_read_the_metrics_rows():
    rows = [("sft", 1, 0.2), ("sft", 2, 0.3), ("rce", 0, 0.3), ("rce", 1, 0.35), ("grpo", 0, 0.35), ("grpo", 1, 0.25)]
    df = pd.DataFrame([{"stage": s, "split": "val", "epoch": e, "acc@1": v} for s, e, v in rows])
    assert val_scores(df, "acc@1") == [("sft", 2, 0.3), ("rce", 1, 0.35), ("grpo", 1, 0.25)]
    sel = select_model(Path("R"), df, "acc@1", "last", "grpo")
    assert (sel.stage, sel.epoch, sel.below_sft) == ("grpo", 1, True) and "BELOW SFT" in sel.line()
    sel = select_model(Path("R"), df, "acc@1", "best_val", "grpo")
    assert (sel.stage, sel.epoch, sel.below_sft, sel.checkpoint) == ("rce", 1, False, str(Path("R/rce_epoch1.pt")))
    # a given SFT checkpoint without RCE rows: SFT is RCE's epoch-0 row... or computed when nothing holds it
    assert select_model(Path("R"), df[df.stage == "grpo"], "acc@1", "best_val", "grpo").sft_val == 0.35
    assert select_model(Path("R"), df[:0], "acc@1", "last", "sft", sft_val=lambda: 0.4).val == 0.4


def test_pipeline_ships_the_best_val_checkpoint(tmp_path):
    from v3kit.pipeline import run_pipeline
    from v3kit.train.checkpoint import load_checkpoint, model_from_checkpoint
    from v3kit.train.metrics import evaluate

    res = run_pipeline(tiny_config(tmp_path / "r", "select=best_val", "rce.lr=1e-3", "grpo.lr=1e-3"))
    sel = json.loads((tmp_path / "r" / "selected.json").read_text())
    assert sel["mode"] == "best_val" and res.selection.stage == sel["stage"]
    metrics = pd.read_csv(tmp_path / "r" / "metrics.csv")
    best = max(v for _, _, v in val_scores(metrics, "acc@1"))
    assert sel["val"] == best
    if sel["stage"] == "sft":
        model = res.models["sft"]
    else:
        model = model_from_checkpoint(load_checkpoint(sel["checkpoint"]), sel["checkpoint"])
    want = evaluate(model, res.splits.test, temperature=1.0, reference=res.models["sft"])
    got = res.table.loc["selected"]
    for m in ("acc@1", "mrr", "utility@1"):
        assert got[m] == pytest.approx(want[m], abs=1e-6)
    assert list(pd.read_csv(tmp_path / "r" / "summary.csv")["stage"]) == ["sft", "rce", "grpo", "selected"]
    with pytest.raises(ConfigError, match="select must be one of"):
        load_config(None, ["select=best"])
    with pytest.raises(ConfigError, match="select_metric must be one of"):
        load_config(None, ["select_metric=entropy"])


def test_sft_checkpoint_key_and_split_seed(tmp_path):
    from v3kit.pipeline import prepare_data, run_pipeline

    a = run_pipeline(tiny_config(tmp_path / "a", "rce.epochs=0", "grpo.epochs=0"))
    b = run_pipeline(
        tiny_config(
            tmp_path / "b",
            "rce.epochs=0",
            "grpo.epochs=0",
            "seed=5",
            "data.split_seed=0",
            f"sft.checkpoint={tmp_path / 'a' / 'sft.pt'}",
        )
    )
    pd.testing.assert_frame_equal(a.table, b.table, check_exact=True)  # same SFT, same test split
    assert prepare_data(tiny_config(tmp_path, "seed=5", "data.split_seed=0")).test.query_ids == a.splits.test.query_ids
    with pytest.raises(ConfigError, match="sft.checkpoint / --sft .* does not exist"):
        run_pipeline(tiny_config(tmp_path / "c", f"sft.checkpoint={tmp_path / 'nope.pt'}"))


# ---------------------------------------------------------------- grids that vary model.* / sft.*


def test_grid_variants_of_sft_and_model_train_each_distinct_sft_once(tmp_path):
    raw = {
        "name": "g",
        "base": ["data.synthetic.n_queries=120", "sft.epochs=2", "rce.epochs=1", "grpo.epochs=1"],
        "seeds": [0, 1],
        "variants": {
            "seed": [],
            "other_seed": ["grpo.kl_beta=0.0"],
            "short": ["sft.epochs=1"],
            "short_too": ["sft.epochs=1", "rce.epochs=0"],
        },
    }
    res = run_grid(parse_grid(raw), tmp_path, progress=False)
    sfts = sorted(p.parent.name for p in (tmp_path / "default").glob("sft*/sft.pt"))
    assert len(sfts) == 2 and "sft" in sfts  # the base SFT and one for sft.epochs=1, each once
    test = res.frame[(res.frame["split"] == "test") & (res.frame["stage"] == "sft")]
    per = test.groupby("variant")["entropy"].agg(["min", "max"])  # the most sensitive number of a model
    assert (per["min"] == per["max"]).all()  # every seed of a variant starts from one SFT
    assert per.loc["seed", "min"] == per.loc["other_seed", "min"]
    assert per.loc["short", "min"] == per.loc["short_too", "min"]
    assert per.loc["short", "min"] != per.loc["seed", "min"]
    with pytest.raises(Exception, match="data.\\* is fixed per world"):
        parse_grid({**raw, "variants": {"x": ["data.val_frac=0.2"]}})


# ---------------------------------------------------------------- investigate


def test_decide_needs_an_interval_that_excludes_zero():
    from v3kit.doctor.investigate import decide

    vs = pd.DataFrame({"diff": [0.05, 0.02, 0.08], "verdict": ["better", "better", "n.s."]}, index=["a", "b", "c"])
    assert decide(vs, "acc@1") == "a"  # c has the best mean but its interval straddles 0
    assert decide(vs.assign(verdict="n.s."), "acc@1") is None
    assert (
        decide(pd.DataFrame({"diff": [-0.1, -0.2], "verdict": ["better", "better"]}, index=["a", "b"]), "regret@1")
        == "b"
    )


SMOKE = ["data.synthetic.n_queries=160", "sft.epochs=2", "rce.epochs=1", "grpo.epochs=1"]


@pytest.fixture(scope="module")
def verdict_dir(tmp_path_factory):
    from v3kit.doctor.investigate import investigate
    from v3kit.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("inv")
    run_pipeline(load_config(None, ["progress=false", *SMOKE, f"run_dir={root / 'run'}"]))
    v = investigate(
        root / "run",
        metric="utility@1",
        out=root / "out",
        budget_minutes=2,
        workers=1,
        max_trials=6,
        top_k=2,
        confirm_seeds=2,
        progress=False,
    )
    return root, v


def test_investigate_writes_a_verdict_that_trains(verdict_dir):
    from v3kit.doctor.investigate import RECOMMENDATIONS
    from v3kit.pipeline import run_pipeline

    root, v = verdict_dir
    out = root / "out"
    data = json.loads((out / "verdict.json").read_text())
    for key in ("metric", "recommendation", "config", "effect_vs_sft", "effect_vs_run", "causes"):
        assert key in data
    assert data["metric"] == "utility@1" and data["recommendation"] in RECOMMENDATIONS
    for key in ("effect_vs_sft", "effect_vs_run"):
        mean, lo, hi = data[key]
        assert lo <= mean <= hi
    assert set(data["references"]) == {"random", "raw_cosine", "reward_oracle"}
    names = {r["variant"] for r in data["variants"]}
    assert {"run", "sft_only", "sft_retrained", "raw_cosine"} <= names  # the run trained its SFT; equal dims
    assert sum(r["kind"] == "finalist" for r in data["variants"]) <= 2  # top_k
    assert data["search"]["trials"] <= 6
    text = (out / "verdict.md").read_text()
    assert text.startswith("# Verdict") and ("Keep SFT" in text or "Ship" in text)
    # the config trains as is, on the run's test split, from the run's SFT
    cfg = load_config(data["config"], [f"run_dir={root / 'again'}", "progress=false"])
    assert cfg.data.split_seed == 0
    res = run_pipeline(cfg)
    confirm = root / "out" / "confirm" / "default" / "run" / "seed100" / "result.json"
    run_split = json.loads(confirm.read_text())["query_ids"]
    assert list(res.splits.test.query_ids) == run_split
    if data["recommendation"] == "keep_sft":  # the run trained its own SFT: the config trains that SFT alone
        assert cfg.rce.epochs == 0 and cfg.grpo.epochs == 0 and cfg.sft.checkpoint is None
        before = pd.read_csv(root / "run" / "summary.csv", index_col=0).loc["sft"]
        pd.testing.assert_series_equal(res.table.loc["sft"], before, check_names=False)  # the same SFT model
    elif not next(r for r in data["variants"] if r["variant"] == data["variant"])["own_sft"]:
        assert cfg.sft.checkpoint == str((root / "run" / "sft.pt").resolve())


def test_investigate_cli_refuses_bad_input(tmp_path, capsys):
    from v3kit.cli import main

    assert main(["investigate", str(tmp_path)]) == 2
    assert "config.yaml not found" in capsys.readouterr().err


def test_doctor_grid_switch_with_two_overrides_is_one_variant():
    from v3kit.config import RunConfig
    from v3kit.diagnose import Finding
    from v3kit.doctor.grid import doctor_grid

    f = Finding("step0_ratio", True, 0.3, 0.05, "m", "s", ["grpo.old_policy=refresh_at_start grpo.kl_reference=sft"])
    grid = doctor_grid(RunConfig(), [f])
    assert grid["variants"]["old_policy_refresh_at_start+kl_reference_sft"] == [
        "grpo.old_policy=refresh_at_start",
        "grpo.kl_reference=sft",
    ]
    yaml.safe_dump(grid)


def test_power_advice_reads_the_design():
    from v3kit.ablate.report import power_lines

    s = pd.DataFrame({"metric": ["acc@1"], "mde": [0.05], "n_queries": [300], "n_seeds": [3], "sft": [0.3]})
    s.attrs["test_frac"] = 0.4
    [line] = power_lines(s, ["acc@1"])
    assert "already 0.4" in line and "test_frac=0.3" not in line
    s.attrs["test_frac"] = 0.1
    assert "now 0.1" in power_lines(s, ["acc@1"])[0]
    s["mde"] = 0.0004  # small effects print with their digits, not as ~0.000
    assert "~0.0004 go undetected" in power_lines(s, ["acc@1"])[0]


def test_best_val_sft_that_only_hurts_val_ships_its_start_bit_identical(tmp_path):
    """select: best_val counts SFT's epoch 0 (its initial model) as a candidate: a residual SFT whose every epoch is
    below its start on val (lr 0.3 on this world: measured, val acc@1 0.25 at the start, below after each epoch)
    ships the initial model, byte for byte, while select: last ships the damaged one."""
    import torch

    from v3kit.pipeline import prepare_data, run_pipeline
    from v3kit.train.checkpoint import load_checkpoint
    from v3kit.train.model import build_model

    over = ["model.residual=true", "model.sim_temperature=0.1", "sft.lr=0.3", "rce.epochs=0", "grpo.epochs=0"]
    best = run_pipeline(tiny_config(tmp_path / "best", *over, "select=best_val"))
    run_pipeline(tiny_config(tmp_path / "last", *over))
    cfg = tiny_config(tmp_path / "x", *over)
    splits = prepare_data(cfg)
    torch.manual_seed(cfg.seed)
    init = build_model(cfg.model, splits.train.query_dim, splits.train.cand_dim).state_dict()
    val = pd.read_csv(tmp_path / "best" / "metrics.csv").query("split == 'val' and stage == 'sft'")
    assert val["acc@1"].iloc[1:].max() < val["acc@1"].iloc[0]  # every epoch hurt val: the start is the best
    shipped = load_checkpoint(tmp_path / "best" / "sft.pt")
    assert shipped["epoch"] == 0 and best.selection.stage == "sft"
    assert all(torch.equal(shipped["model"][k], init[k]) for k in init)
    trained = load_checkpoint(tmp_path / "last" / "sft.pt")
    assert trained["epoch"] == 3 and not all(torch.equal(trained["model"][k], init[k]) for k in init)
    assert best.selection.val == val["acc@1"].iloc[0]


def test_residual_linear_starts_at_the_raw_cosine():
    """model.residual_kind=linear: normalize(x + W x) with W = 0 at init, so its scores are the raw cosine."""
    import torch

    from v3kit.train.model import ModelConfig, build_model

    torch.manual_seed(0)
    m = build_model(ModelConfig(residual=True, residual_kind="linear"), 6, 6)
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    want = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(y, dim=-1).T
    got = m.encode_query(x) @ m.encode_candidates(y).T
    assert torch.allclose(got, want, atol=1e-6)
    assert sum(p.numel() for p in m.parameters()) == 2 * 36  # one square W per tower, no bias
