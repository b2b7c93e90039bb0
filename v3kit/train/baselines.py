"""Trivial rankers to read the stage table against: what ranking without any learning already gets.

* ``random``: the *expected* metrics of a uniformly random ranking (exact, no sampling): acc@1 = mean 1/n,
  mrr = mean H_n / n, reward@1 = the group's mean reward, ndcg@5 = mean gain x the discounts of the first
  min(5, n) places / ideal DCG.
* ``raw_cosine``: cosine of the raw query and candidate features (only when their dims match).
* ``reward_oracle``: rank by the reward itself. Its acc@1 is the reward's label agreement (how often the
  highest-reward candidate is the label); 1 - that is the reward-label disagreement rate.

If SFT ranks below ``raw_cosine`` on the label metrics, the v2 model itself is the weakest link: tune SFT (or the
features) before RCE or GRPO.
"""

from __future__ import annotations

import pandas as pd
import torch

from ..data.contract import GroupData
from .metrics import metric_order, ranking_metrics

__all__ = ["BASELINES", "baseline_metrics", "baseline_table", "random_expected_metrics"]

BASELINES = ("random", "raw_cosine", "reward_oracle")


def random_expected_metrics(data: GroupData, k: int = 5) -> dict[str, float]:
    """Exact expected metrics of a uniformly random ranking of each group (no sampling noise)."""
    mask = data.mask
    n = mask.sum(1).double()
    r = torch.where(mask, data.rewards.double(), torch.zeros_like(data.rewards, dtype=torch.float64))
    mean_r = r.sum(1) / n
    harmonic = torch.stack([torch.arange(1, int(m) + 1, dtype=torch.float64).reciprocal().sum() for m in n])
    big = torch.finfo(torch.float64).max
    r_max = r.masked_fill(~mask, -big).amax(1)
    gains = torch.where(mask, r - r.masked_fill(~mask, big).amin(1, keepdim=True), torch.zeros_like(r))
    kk = min(k, mask.shape[1])
    disc = 1.0 / torch.log2(torch.arange(2, kk + 2, dtype=torch.float64))
    places = torch.arange(kk).unsqueeze(0) < n.unsqueeze(1)  # a group of n < k fills only n places
    # Every place holds each candidate with probability 1/n: expected gain there = the group's mean gain.
    edcg = (gains.sum(1) / n) * (disc * places).sum(1)
    idcg = (torch.sort(gains, 1, descending=True).values[:, :kk] * disc).sum(1)
    ndcg = edcg[idcg > 0] / idcg[idcg > 0]
    out = {
        "acc@1": float((1 / n).mean()),
        "mrr": float((harmonic / n).mean()),
        f"ndcg@{k}": float(ndcg.mean()) if ndcg.numel() else 1.0,
        "reward@1": float(mean_r.mean()),
        "regret@1": float((r_max - mean_r).mean()),
    }
    if data.utility is not None:
        u = torch.where(mask, data.utility.double(), torch.zeros_like(r))
        out["utility@1"] = float((u.sum(1) / n).mean())
    return out


def baseline_metrics(data: GroupData, name: str, k: int = 5) -> dict[str, float] | None:
    """Metrics of one baseline on ``data``; None for ``raw_cosine`` when query and candidate dims differ."""
    if name == "random":
        return random_expected_metrics(data, k)
    if name == "raw_cosine":
        if data.query_dim != data.cand_dim:
            return None
        q = torch.nn.functional.normalize(data.query_x, dim=-1)
        c = torch.nn.functional.normalize(data.cand_x, dim=-1)
        scores = torch.einsum("bd,bgd->bg", q, c)
    elif name == "reward_oracle":
        scores = data.rewards
    else:
        raise ValueError(f"unknown baseline {name!r}; choose from {BASELINES}")
    return ranking_metrics(scores, data.labels, data.rewards, data.mask, k=k, utility=data.utility)


def baseline_table(data: GroupData, names: tuple[str, ...] = BASELINES, k: int = 5) -> pd.DataFrame:
    """One row per baseline (index ``stage``, like :func:`v3kit.pipeline.stage_table`, so the two concatenate)."""
    rows = {n: m for n in names if (m := baseline_metrics(data, n, k)) is not None}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "stage"
    return table[metric_order(table.columns)]
