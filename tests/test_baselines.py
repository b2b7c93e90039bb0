"""Trivial baselines: exact random expectations (against enumerating every ranking), raw cosine, reward oracle,
and the doctor's SFT-vs-baselines check."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch

from v3kit.data import GroupData, split_by_query
from v3kit.data.reward_stats import label_reward_agreement
from v3kit.diagnose import diagnose
from v3kit.train.baselines import baseline_metrics, baseline_table, random_expected_metrics
from v3kit.train.metrics import per_group_metrics


def small_data(n: int = 12, G: int = 4, dq: int = 3, dc: int = 3, seed: int = 0) -> GroupData:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(2, G + 1, (n,), generator=g)
    mask = torch.arange(G).unsqueeze(0) < sizes.unsqueeze(1)
    rewards = torch.where(mask, torch.randn(n, G, generator=g), torch.zeros(()))
    labels = torch.stack([torch.randint(0, int(s), (1,), generator=g)[0] for s in sizes])
    return GroupData(
        torch.randn(n, dq, generator=g),
        torch.randn(n, G, dc, generator=g),
        mask,
        labels,
        rewards,
        [str(i) for i in range(n)],
        utility=torch.where(mask, torch.randn(n, G, generator=g), 0.0),
    )


def test_random_baseline_is_the_exact_mean_over_every_ranking():
    data = small_data()
    sums: dict[str, list[float]] = {}
    for b in range(len(data)):
        n = int(data.mask[b].sum())
        per: dict[str, list[float]] = {}
        for perm in itertools.permutations(range(n)):  # every ranking of the group, equally likely
            scores = torch.full((1, data.group_size), -1.0)
            scores[0, :n] = torch.tensor([float(n - perm.index(i)) for i in range(n)])
            m = per_group_metrics(
                scores,
                data.labels[b : b + 1],
                data.rewards[b : b + 1],
                data.mask[b : b + 1],
                utility=data.utility[b : b + 1],
            )
            for k, v in m.items():
                per.setdefault(k, []).append(float(v[0]))
        for k, v in per.items():
            if not any(math.isnan(x) for x in v):
                sums.setdefault(k, []).append(float(np.mean(v)))
    expected = random_expected_metrics(data)
    for k in ("acc@1", "mrr", "ndcg@5", "reward@1", "regret@1", "utility@1"):
        assert expected[k] == pytest.approx(np.mean(sums[k]), abs=1e-6), k


def test_raw_cosine_and_reward_oracle():
    data = small_data()
    cos = baseline_metrics(data, "raw_cosine")
    hits = []
    for b in range(len(data)):
        n = int(data.mask[b].sum())
        q = data.query_x[b].numpy()
        sims = [
            float(q @ data.cand_x[b, j].numpy()) / (np.linalg.norm(q) * np.linalg.norm(data.cand_x[b, j].numpy()))
            for j in range(n)
        ]
        hits.append(int(np.argmax(sims)) == int(data.labels[b]))
    assert cos["acc@1"] == pytest.approx(np.mean(hits))
    assert baseline_metrics(small_data(dq=3, dc=5), "raw_cosine") is None
    oracle = baseline_metrics(data, "reward_oracle")
    assert oracle["acc@1"] == pytest.approx(label_reward_agreement(data)) and oracle["regret@1"] == 0.0
    table = baseline_table(small_data(dq=3, dc=5))
    assert list(table.index) == ["random", "reward_oracle"]  # no cosine across different dims
    no_utility = small_data()
    no_utility.utility = None
    assert "utility@1" not in baseline_table(no_utility).columns  # real data: no empty utility column


def test_doctor_says_the_v2_model_is_the_weakest_link_when_sft_is_below_raw_cosine():
    g = torch.Generator().manual_seed(0)
    n, G, d = 200, 5, 8
    q = torch.randn(n, d, generator=g)
    c = torch.randn(n, G, d, generator=g)
    labels = torch.randint(0, G, (n,), generator=g)
    c[torch.arange(n), labels] = q + 0.5 * torch.randn(n, d, generator=g)  # the label is the query's near twin
    data = GroupData(
        q, c, torch.ones(n, G, dtype=torch.bool), labels, torch.randn(n, G, generator=g), [str(i) for i in range(n)]
    )
    splits = split_by_query(data, val_frac=0.3, test_frac=0.2, seed=0)
    rows = [{"stage": "rce", "split": "val", "epoch": 0, "step": 0, "acc@1": a, "mrr": 0.5} for a in (0.3,)]
    f = {x.check: x for x in diagnose(pd.DataFrame(rows), splits=splits)}["baselines"]
    assert f.triggered and "weakest link" in f.message and f.value == 0.3 and f.threshold > 0.9
    rows[0]["acc@1"] = 1.0
    assert not {x.check: x for x in diagnose(pd.DataFrame(rows), splits=splits)}["baselines"].triggered


def test_stage_table_can_show_the_baselines_beside_the_stages():
    from v3kit.pipeline import stage_table
    from v3kit.train.model import ModelConfig, build_model

    data = small_data()
    model = build_model(ModelConfig(), data.query_dim, data.cand_dim)
    plain = stage_table({"sft": model}, data, model, 1.0)
    both = stage_table({"sft": model}, data, model, 1.0, baselines=True)
    assert list(both.index) == ["sft", "random", "raw_cosine", "reward_oracle"]
    pd.testing.assert_frame_equal(both.loc[["sft"]], plain, check_dtype=False)
    assert both.loc["reward_oracle", "acc@1"] == pytest.approx(label_reward_agreement(data))


def test_plots_leave_out_utility_when_the_data_has_none():
    from matplotlib.figure import Figure

    from v3kit.notebook import report_plots
    from v3kit.notebook.plots import DEFAULT_PANELS, draw_panels

    evals = pd.DataFrame({"epoch": [0, 1], "acc@1": [0.3, 0.31], "reward@1": [1.0, 1.1]})
    train = pd.DataFrame({"step": [1, 2], "loss": [1.0, 0.9]})
    fig = draw_panels(Figure(), DEFAULT_PANELS["grpo"], train, evals)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert "held-out acc@1" in titles and not any("utility" in t for t in titles)
    summary = pd.DataFrame(
        [
            {
                "world": "default",
                "variant": v,
                "metric": m,
                "diff": 0.0,
                "diff_low": -0.1,
                "diff_high": 0.1,
                "verdict": "n.s.",
            }
            for v in ("a", "b")
            for m in ("acc@1", "reward@1")
        ]
    )
    fig = report_plots.forest_plot(summary)  # default metrics include utility@1: no empty panel for it
    assert [ax.get_title().split(" - ")[0] for ax in fig.axes] == ["acc@1", "reward@1"]
