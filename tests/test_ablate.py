"""The ablation runner: grid parsing and its errors, resumable runs, bootstrap summaries and generated conclusions."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from v3kit import ablate
from v3kit.ablate import (
    MIN_RUNS_FOR_SEEDS_ONLY_VERDICT,
    GridError,
    bootstrap_mean_ci,
    conclusions,
    parse_grid,
    run_grid,
    summarize,
)
from v3kit.cli import main

TINY_BASE = ["data.synthetic.n_queries=80", "sft.epochs=1", "rce.epochs=1", "grpo.epochs=1", "grpo.lr=1e-3"]


def tiny_grid(**extra):
    raw = {
        "name": "tiny",
        "base": list(TINY_BASE),
        "seeds": [0, 1],
        "reference": "seed",
        "variants": {"sft_only": ["rce.epochs=0", "grpo.epochs=0"], "seed": []},
    }
    raw.update(extra)
    return raw


# ------------------------------------------------------------------------------------------------ parsing
def test_grid_parses_and_resolves_each_variant():
    spec = parse_grid(tiny_grid(variants={"seed": [], "kl0": ["grpo.kl_beta=0"]}))
    assert spec.seeds == [0, 1] and list(spec.variants) == ["seed", "kl0"]
    cfg = spec.resolve("default", "kl0", seed=1, run_dir="x")
    assert cfg.grpo.kl_beta == 0.0 and cfg.seed == 1 and cfg.data.synthetic.n_queries == 80
    assert spec.value("kl0", "grpo.kl_beta") == 0.0 and spec.value("seed", "grpo.kl_beta") == 0.1


@pytest.mark.parametrize(
    "raw, needles",
    [
        (tiny_grid(variants={"seed": [], "typo": ["grpo.kl_bta=0.0"]}), ["typo", "grpo.kl_bta", "grpo.kl_beta"]),
        (tiny_grid(variants={"seed": [], "bad": ["grpo.old_policy=fresh"]}), ["bad", "grpo.old_policy"]),
        (
            tiny_grid(variants={"seed": [], "moves_data": ["data.val_frac=0.2"]}),
            ["moves_data", "data.val_frac", "base"],
        ),
        (tiny_grid(variants={"seed": [], "own_seed": ["seed=3"]}), ["own_seed", "seeds"]),
        (tiny_grid(variants={"seed": [], "noeq": ["grpo.kl_beta"]}), ["noeq", "key=value"]),
        (tiny_grid(seeds=[]), ["grid.seeds"]),
        (tiny_grid(reference="nope"), ["reference", "nope"]),
        (tiny_grid(varients={}), ["varients"]),
        (tiny_grid(questions={"q": ["seed", "ghost"]}), ["q", "ghost"]),
        (
            tiny_grid(worlds={"levels": {"b0": ["data.synthetic.reward_bais=0"]}, "variants": ["seed"]}),
            ["b0", "reward_bais"],
        ),
        (tiny_grid(worlds={"levels": {"b0": ["data.synthetic.reward_bias=0"]}, "variants": ["ghost"]}), ["ghost"]),
    ],
)
def test_grid_errors_name_the_culprit(raw, needles):
    with pytest.raises(GridError) as e:
        parse_grid(raw)
    for n in needles:
        assert n in str(e.value)


def test_shipped_grids_parse():
    for path in ("configs/ablate_default.yaml", "configs/ablate_smoke.yaml"):
        spec = ablate.load_grid(path)
        assert len(spec.seeds) >= 2 and spec.reference in spec.variants
    default = ablate.load_grid("configs/ablate_default.yaml")
    assert len(default.seeds) >= 3 and default.worlds is not None
    for needed in ("sft_only", "rce1_only", "rce3_only", "rce10_only", "seed", "grpo_no_rce", "grpo25"):
        assert needed in default.variants


# ------------------------------------------------------------------------------------------------ running
@pytest.mark.slow
def test_grid_runs_resumes_and_reruns_only_what_changed(tmp_path, capsys):
    out = tmp_path / "grid"
    res = run_grid(parse_grid(tiny_grid()), out, workers=2, progress=False)
    assert (res.executed, res.skipped) == (4, 0)
    f = res.frame
    assert set(f["split"]) == {"val", "test"} and set(f["variant"]) == {"sft_only", "seed"}
    for col in ("world", "variant", "seed", "stage", "epoch", "acc@1", "reward@1", "utility@1", "run_dir"):
        assert col in f.columns
    assert (out / "results.csv").exists() and (out / "results.parquet").exists() and (out / "summary.csv").exists()
    assert (res.run_dir("seed", 1) / "metrics.csv").exists() and not list(res.run_dir("seed", 1).glob("*.pt"))
    # The SFT checkpoint is shared: every run's SFT test row is the same.
    sft_rows = f[(f["split"] == "test") & (f["stage"] == "sft")]
    assert sft_rows["acc@1"].nunique() == 1 and len(sft_rows) == 4
    # Per-query outcomes average to the pipeline's own test metrics.
    payload = json.loads((res.run_dir("seed", 0) / "result.json").read_text())
    final = f[(f["variant"] == "seed") & (f["seed"] == 0) & (f["split"] == "test") & (f["stage"] == "grpo")].iloc[0]
    for m in ("acc@1", "mrr", "reward@1", "regret@1", "utility@1", "kl_to_sft", "entropy"):
        assert np.mean(payload["per_query"]["grpo"][m]) == pytest.approx(final[m], abs=1e-5), m

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("default/*/seed*/result.json")}
    again = run_grid(parse_grid(tiny_grid()), out, workers=1, progress=False)
    assert (again.executed, again.skipped) == (0, 4)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    pd.testing.assert_frame_equal(again.frame, res.frame)

    # Changing one variant's overrides reruns exactly its runs (the result files carry a config hash).
    changed = run_grid(
        parse_grid(tiny_grid(variants={"sft_only": ["rce.epochs=0", "grpo.epochs=0"], "seed": ["grpo.kl_beta=0.0"]})),
        out,
        progress=False,
    )
    assert (changed.executed, changed.skipped) == (2, 2)

    # The CLI on the finished grid executes nothing and prints the summary and the conclusions.
    grid_file = tmp_path / "g.yaml"
    import yaml

    grid_file.write_text(
        yaml.safe_dump(
            tiny_grid(variants={"sft_only": ["rce.epochs=0", "grpo.epochs=0"], "seed": ["grpo.kl_beta=0.0"]})
        )
    )
    assert main(["ablate", "--grid", str(grid_file), "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "0 run(s) executed, 4 skipped" in text and "difference to SFT" in text and "World 'default'" in text


# ------------------------------------------------------------------------------------------------ statistics
def _crafted(diffs: dict[str, list[float]], sft: float = 0.5) -> pd.DataFrame:
    rows = []
    for v, ds in diffs.items():
        for seed, d in enumerate(ds):
            for stage, val in (("sft", sft), ("grpo", sft + d)):
                rows.append(
                    {
                        "world": "default",
                        "variant": v,
                        "seed": seed,
                        "split": "test",
                        "stage": stage,
                        "epoch": 1,
                        "acc@1": val,
                    }
                )
    return pd.DataFrame(rows)


def test_bootstrap_matches_a_hand_computed_one():
    x = np.array([0.1, 0.4, -0.2, 0.3])
    rng = np.random.default_rng(7)
    idx = rng.integers(0, 4, (500, 4))
    hand = [sum(x[i] for i in row) / 4 for row in idx]
    lo, hi = np.quantile(hand, [0.025, 0.975])
    assert bootstrap_mean_ci(x, n_boot=500, seed=7) == pytest.approx((lo, hi))

    # Two levels: seeds drawn first, then the queries shared by the drawn seeds.
    m = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    rng = np.random.default_rng(3)
    s_idx, q_idx = rng.integers(0, 2, (300, 2)), rng.integers(0, 3, (300, 3))
    hand2 = [np.mean([np.mean([m[s, q] for q in q_idx[b]]) for s in s_idx[b]]) for b in range(300)]
    assert bootstrap_mean_ci(m, n_boot=300, seed=3) == pytest.approx(tuple(np.quantile(hand2, [0.025, 0.975])))


def test_summarize_means_cis_and_paired_differences():
    frame = _crafted({"seed": [0.0, 0.02, -0.02], "good": [0.10, 0.12, 0.11], "bad": [-0.2, -0.25, -0.22]})
    s = summarize(frame, metrics=["acc@1"], reference="seed", n_boot=400, seed=1).set_index("variant")
    good = s.loc["good"]
    assert good["mean"] == pytest.approx(0.5 + 0.11) and good["diff"] == pytest.approx(0.11)
    assert (good["diff_low"], good["diff_high"]) == pytest.approx(
        bootstrap_mean_ci(np.array([0.10, 0.12, 0.11]), n_boot=400, seed=1)
    )
    for v in s.index:  # the interval contains the estimate
        assert s.loc[v, "diff_low"] <= s.loc[v, "diff"] <= s.loc[v, "diff_high"]
        assert s.loc[v, "ci_low"] <= s.loc[v, "mean"] <= s.loc[v, "ci_high"]
    # Three seeds and no per-query outcomes: the interval is about [min, max], too weak for a verdict.
    assert good["ci_method"] == "seeds" and (s["verdict"] == "").all() and (s["vs_ref_verdict"] == "").all()
    # Against the reference, seed k of a variant is paired with seed k of the reference.
    assert good["vs_ref"] == pytest.approx(np.mean([0.10, 0.10, 0.13]))
    assert s.loc["seed", "vs_ref"] == 0.0


def test_seeds_only_verdicts_need_enough_runs():
    rng = np.random.default_rng(0)
    n = MIN_RUNS_FOR_SEEDS_ONLY_VERDICT
    frame = _crafted(
        {
            "seed": list(rng.normal(0, 0.01, n)),
            "good": list(0.1 + rng.normal(0, 0.01, n)),
            "bad": list(-0.2 + rng.normal(0, 0.01, n)),
        }
    )
    s = summarize(frame, metrics=["acc@1"], reference="seed", n_boot=400, seed=1).set_index("variant")
    assert s.loc["good", "verdict"] == "better" and s.loc["bad", "verdict"] == "worse"
    assert s.loc["seed", "verdict"] == "n.s." and s.loc["bad", "vs_ref_verdict"] == "worse"


def test_seeds_only_bootstrap_is_anticonservative_with_three_seeds():
    """Why the rule above exists: on null differences a 3-run percentile CI excludes 0 far more than 5% of the time."""
    rng = np.random.default_rng(0)
    trials = [bootstrap_mean_ci(rng.normal(size=3), n_boot=200, seed=i) for i in range(300)]
    false_positive = np.mean([lo > 0 or hi < 0 for lo, hi in trials])
    assert false_positive > 0.15


def test_summarize_resamples_queries_when_given_per_query_outcomes():
    # Two seeds agree exactly, so a seeds-only CI would be a point; the query-level one is not.
    frame = _crafted({"v": [0.25, 0.25]})
    pq = []
    for seed in (0, 1):
        for stage, vals in (("sft", [1, 0, 0, 1]), ("grpo", [1, 1, 0, 1])):
            pq += [
                {"world": "default", "variant": "v", "seed": seed, "stage": stage, "query": q, "acc@1": a}
                for q, a in enumerate(vals)
            ]
    s = summarize(frame, pd.DataFrame(pq), metrics=["acc@1"], n_boot=300, seed=0).iloc[0]
    assert s["ci_method"] == "seeds x queries" and s["diff"] == pytest.approx(0.25)
    assert s["diff_low"] == pytest.approx(0.0) and s["diff_high"] > 0.25  # 3 of 4 queries unchanged


def test_conclusions_reflect_the_numbers():
    n = MIN_RUNS_FOR_SEEDS_ONLY_VERDICT  # enough seeds for a seeds-only verdict
    jitter = [0.01 * ((i % 3) - 1) for i in range(n)]  # -0.01, 0, +0.01, ...: mean 0 when n % 3 == 1
    seed_d = [-0.05 + j for j in jitter]
    frame = _crafted({"seed": seed_d, "good": [0.11 + j for j in jitter], "noisy": [0.3 * (-1) ** i for i in range(n)]})
    s = summarize(frame, metrics=["acc@1"], reference="seed", n_boot=400)
    text = conclusions(s, metrics=["acc@1"])
    better = next(line for line in text.splitlines() if "significantly better than SFT" in line)
    worse = next(line for line in text.splitlines() if "significantly worse than SFT" in line)
    assert "good" in better and "noisy" not in better and "seed" not in better
    assert "seed" in worse and "good" not in worse
    assert (
        f"The reference 'seed' vs SFT: acc@1 {0.5 + np.mean(seed_d):.3f} vs SFT 0.500: {np.mean(seed_d):+.3f}" in text
    )
    better_ref = next(line for line in text.splitlines() if "significantly better than 'seed'" in line)
    assert "good" in better_ref
    # Flip the numbers and the text follows.
    flipped = summarize(
        _crafted({"seed": [0.05 + j for j in jitter], "good": [-0.11 + j for j in jitter]}),
        metrics=["acc@1"],
        reference="seed",
        n_boot=400,
    )
    text2 = conclusions(flipped, metrics=["acc@1"])
    assert "significantly worse than SFT: good" in text2 and "significantly better than SFT: seed" in text2


def test_summary_states_the_minimum_detectable_effect_and_warns_when_too_wide():
    from v3kit.ablate import format_summary

    rng = np.random.default_rng(0)
    frame = _crafted({"v": [0.25, 0.25]})
    frame["mrr"] = frame["acc@1"] * 0.9
    frame["ndcg@5"] = frame["acc@1"] * 0.8
    frame["reward@1"] = frame["acc@1"] + 1.0

    def pq_rows(n_q: int, noise: float) -> pd.DataFrame:
        """Paired outcomes: GRPO flips 5% of SFT's misses to hits (+ noise of this share of queries)."""
        rows = []
        sft = (rng.random(n_q) < 0.5).astype(float)
        for seed in (0, 1):
            grpo = np.where(rng.random(n_q) < 0.05 + noise, 1.0, sft)
            for stage, vals in (("sft", sft), ("grpo", grpo)):
                rows += [
                    {
                        "world": "default",
                        "variant": "v",
                        "seed": seed,
                        "stage": stage,
                        "query": q,
                        "acc@1": a,
                        "mrr": a,
                        "ndcg@5": a,
                        "reward@1": a,
                    }
                    for q, a in enumerate(vals)
                ]
        return pd.DataFrame(rows)

    small = summarize(frame, pq_rows(40, 0.0), n_boot=300, seed=0)
    acc = small.set_index("metric").loc["acc@1"]
    # MDE = (1.96 + 0.84) standard errors, the SE read off the 95% CI's half-width
    assert acc["mde"] == pytest.approx(2.8 * (acc["diff_high"] - acc["diff_low"]) / 2 / 1.959964, rel=1e-4)
    assert acc["n_queries"] == 40
    text = format_summary(small)
    header = text.splitlines()[1]
    assert all(m in header for m in ("acc@1", "mrr", "ndcg@5", "reward@1")) and "utility@1" not in header
    power = [ln for ln in text.splitlines() if ln.startswith("Power: acc@1")]
    assert power and "40 test queries x 2+ seeds" in power[0] and "too wide to tell" in power[0]
    # four times the queries halve the MDE (about): and with enough, no warning
    big = summarize(frame, pq_rows(4000, 0.0), n_boot=300, seed=0).set_index("metric").loc["acc@1"]
    assert big["mde"] < acc["mde"] / 5
    assert (
        "too wide"
        not in [
            ln
            for ln in format_summary(summarize(frame, pq_rows(4000, 0.0), n_boot=300)).splitlines()
            if ln.startswith("Power: acc@1")
        ][0]
    )


def test_best_variant_uses_acc_on_data_without_utility():
    from v3kit.ablate import best_metric, best_variant

    spec = parse_grid(
        tiny_grid(
            variants={
                "sft_only": ["rce.epochs=0", "grpo.epochs=0"],
                "seed": [],
                "a": ["grpo.kl_beta=0"],
                "b": ["grpo.kl_beta=0.5"],
            }
        )
    )
    rows = [
        {"world": "default", "variant": v, "seed": 0, "split": "test", "stage": "grpo", "acc@1": acc}
        for v, acc in (("a", 0.3), ("b", 0.4), ("seed", 0.9))
    ]
    frame = pd.DataFrame(rows)
    assert best_metric(frame, spec) == "acc@1" and best_variant(frame, spec) == "b"  # the reference is left out
    frame["utility@1"] = [2.0, 1.0, 0.0]
    assert best_metric(frame, spec) == "utility@1" and best_variant(frame, spec) == "a"


def test_grid_sft_checkpoint_must_exist_and_excludes_worlds(tmp_path):
    with pytest.raises(GridError, match="sft_checkpoint .* does not exist"):
        parse_grid(tiny_grid(sft_checkpoint=str(tmp_path / "nope.pt")))
    ckpt = tmp_path / "sft.pt"
    ckpt.write_bytes(b"x")
    assert parse_grid(tiny_grid(sft_checkpoint=str(ckpt))).sft_checkpoint == str(ckpt)
    with pytest.raises(GridError, match="drop one of the two"):
        parse_grid(tiny_grid(sft_checkpoint=str(ckpt), worlds={"variants": ["seed"], "levels": {"b": []}}))


def test_conclusions_on_data_without_utility_read_the_label_metrics_and_the_disagreement_rate():
    n = MIN_RUNS_FOR_SEEDS_ONLY_VERDICT
    frame = _crafted({"seed": [-0.05 + 0.01 * (i % 3) for i in range(n)], "good": [0.1] * n})
    frame["mrr"] = frame["acc@1"] / 2 + 0.4  # a second label metric, as real data has
    frame["reward_label_agreement"] = 0.625
    s = summarize(frame, metrics=["acc@1", "mrr"], reference="seed", n_boot=200)
    assert s.attrs["reward_label_agreement"] == {"default": 0.625}
    text = conclusions(s)  # the default metrics name utility@1, which this data lacks
    assert "label in 62% of queries (reward-label disagreement 38%)" in text
    assert "No true utility in this data" in text
    assert "\nmrr:" in text and "utility@1" not in text
