"""Reward shortcut analysis: how much of the reward's within-group ranking any query would give the candidate.

Within each group GRPO only sees the reward relative to the group (advantages are centred per group), so split the
within-group-centred reward ``y = r - mean_g(r)`` into

* a *query-independent* part ``s``: what a model of the candidate's features alone predicts (ridge regression from
  the candidate features, centred per group, to ``y``; cross-fitted over ``k_folds`` folds of queries, so the part
  is always predicted for queries the fit never saw), and
* the *query-dependent* rest ``y - s``.

A reward that pays for something in the candidate whatever the query asked (length, a templated phrase, a "style")
has a large query-independent part: a policy can raise its reward by learning that shortcut without reading the
query. The analysis reports the share of within-group reward variance the shortcut explains, how well ranking by the
shortcut alone finds the label (``acc@1``), and, given the policy's change of logits from SFT, which part the policy
followed: the correlation of its within-group-centred logit change with the shortcut, with the rest and with the
label. Nothing here needs a true utility: it works on any data with rewards, labels and candidate features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from .contract import GroupData

__all__ = [
    "ShortcutAnalysis",
    "centre_in_group",
    "centred_features",
    "cross_fit_ridge",
    "fit_ridge",
    "reward_shortcut",
    "shortcut_frame",
]


def centre_in_group(x: Tensor, mask: Tensor) -> Tensor:
    """``x - mean_g(x)`` over each group's valid entries; 0 at padding."""
    m = mask.to(x.dtype)
    xm = torch.where(mask, x, torch.zeros_like(x))
    mean = xm.sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1)
    return torch.where(mask, x - mean, torch.zeros_like(x))


def centred_features(data: GroupData) -> Tensor:
    """[N, G, Dc] the candidate features minus their group's mean (float64; 0 at padding): the reward is compared
    within groups, so only how a candidate differs from its group-mates can explain it."""
    # in place on one float64 copy: a 2,000-query 384-d table is 40 MB a pass, and this is most of a de-biasing fit
    x = data.cand_x.to(torch.float64, copy=True)
    pad = ~data.mask.unsqueeze(-1)
    full = not bool(pad.any())
    sums = (x if full else x.masked_fill(pad, 0.0)).sum(1, keepdim=True)
    x.sub_(sums / data.mask.sum(1).clamp_min(1).view(-1, 1, 1).to(x.dtype))
    return x if full else x.masked_fill_(pad, 0.0)


def fit_ridge(xc: Tensor, y: Tensor, fit: Tensor, ridge: float) -> Tensor:
    """Ridge weights [Dc] from the entries ``fit`` ([N, G] bool) of ``xc`` to ``y`` (no intercept: both are centred
    per group)."""
    xf, yf = xc[fit], y[fit]
    eye = torch.eye(xc.shape[-1], dtype=xc.dtype)
    return torch.linalg.solve(xf.T @ xf + ridge * eye, xf.T @ yf)


def cross_fit_ridge(xc: Tensor, y: Tensor, mask: Tensor, folds: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """Cross-fitted ridge predictions ``[N, G]`` (each group's from the fit on the other folds' groups; 0 at padding)
    and the weights ``[Dc]`` fitted on every group; ``folds``: ``[N]`` fold of each group, ``0 .. k - 1``.

    Each fold's normal equations (``X'X``, ``X'y``) are summed once; a fit on all folds but one adds up the others'.
    That is one pass over the data for all ``k + 1`` fits, where a fit over each fold's complement read most of the
    data each time (with :func:`centred_features` in place, a de-biasing estimate on a 2,000-query 384-d table takes
    0.23 s against 0.80 s); the same solution up to float64 rounding."""
    k = int(folds.max()) + 1 if len(folds) else 0
    grams, moments = [], []
    for f in range(k):
        rows = (folds == f).unsqueeze(1) & mask
        xf, yf = xc[rows], y[rows]
        grams.append(xf.T @ xf)
        moments.append(xf.T @ yf)
    eye = ridge * torch.eye(xc.shape[-1], dtype=xc.dtype)
    pred = torch.zeros_like(y)
    for f in range(k):
        others = [j for j in range(k) if j != f]
        gram = torch.stack([grams[j] for j in others]).sum(0)
        w = torch.linalg.solve(gram + eye, torch.stack([moments[j] for j in others]).sum(0))
        held = folds == f
        pred[held] = xc[held] @ w
    full = torch.linalg.solve(torch.stack(grams).sum(0) + eye, torch.stack(moments).sum(0))
    return torch.where(mask, pred, torch.zeros((), dtype=pred.dtype)), full


def _corr(a: Tensor, b: Tensor, mask: Tensor) -> float:
    """Pearson correlation of two within-group-centred fields over the valid entries (nan when one is constant)."""
    x, y = a[mask].double(), b[mask].double()
    x, y = x - x.mean(), y - y.mean()
    den = float((x.square().sum() * y.square().sum()).sqrt())
    return float((x * y).sum()) / den if den > 0 else float("nan")


@dataclass
class ShortcutAnalysis:
    explained_share: float  # share of within-group reward variance the query-independent part explains (cross-fitted)
    acc_shortcut: float  # acc@1 of ranking each group by the query-independent part alone
    acc_reward: float  # acc@1 of ranking by the reward itself (the reward oracle), for scale
    n_groups: int
    k_folds: int
    corr_change_shortcut: float | None = None  # corr(policy - SFT logit change, query-independent part)
    corr_change_rest: float | None = None  # corr(logit change, query-dependent rest)
    corr_change_label: float | None = None  # corr(logit change, centred one-hot label)
    shortcut: Tensor | None = field(default=None, repr=False)  # [N, G] the query-independent part (0 at padding)
    rest: Tensor | None = field(default=None, repr=False)  # [N, G] the query-dependent rest

    def as_dict(self) -> dict[str, float | None]:
        return {
            k: getattr(self, k)
            for k in (
                "explained_share",
                "acc_shortcut",
                "acc_reward",
                "corr_change_shortcut",
                "corr_change_rest",
                "corr_change_label",
                "n_groups",
                "k_folds",
            )
        }


def reward_shortcut(
    data: GroupData,
    logit_change: Tensor | None = None,
    *,
    k_folds: int = 5,
    ridge: float = 1.0,
    seed: int = 0,
) -> ShortcutAnalysis:
    """Split ``data``'s within-group-centred rewards into a query-independent and a query-dependent part.

    ``ridge`` is the L2 penalty of the linear fit (on features centred per group; an intercept would cancel in the
    centring). ``logit_change`` ([N, G], e.g. ``log pi_policy - log pi_SFT``) adds the correlations of what the
    policy changed with each part and with the label.
    """
    if k_folds < 2:
        raise ValueError(f"k_folds must be >= 2, got {k_folds}")
    n = len(data)
    if n < k_folds:
        raise ValueError(f"reward_shortcut needs at least k_folds={k_folds} groups, got {n}")
    mask = data.mask
    y = centre_in_group(data.rewards.double(), mask)
    xc = centred_features(data)
    folds = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) % k_folds
    pred, _ = cross_fit_ridge(xc, y, mask, folds, ridge)
    sst = float(y[mask].square().sum())
    share = 1.0 - float((y - pred)[mask].square().sum()) / sst if sst > 0 else float("nan")
    neg = torch.tensor(float("-inf"), dtype=pred.dtype)
    acc_s = float((torch.where(mask, pred, neg).argmax(1) == data.labels).double().mean())
    acc_r = float((data.rewards.masked_fill(~mask, float("-inf")).argmax(1) == data.labels).double().mean())
    out = ShortcutAnalysis(share, acc_s, acc_r, n, k_folds, shortcut=pred.float(), rest=(y - pred).float())
    if logit_change is not None:
        if logit_change.shape != mask.shape:
            raise ValueError(f"logit_change has shape {tuple(logit_change.shape)}, expected {tuple(mask.shape)}")
        d = centre_in_group(torch.where(mask, logit_change.double(), torch.zeros_like(y)), mask)
        label = centre_in_group(torch.nn.functional.one_hot(data.labels, mask.shape[1]).double(), mask)
        out.corr_change_shortcut = _corr(d, pred, mask)
        out.corr_change_rest = _corr(d, y - pred, mask)
        out.corr_change_label = _corr(d, label, mask)
    return out


def shortcut_frame(analyses: dict[str, ShortcutAnalysis]) -> pd.DataFrame:
    """One row per named analysis (e.g. per world or run): the numbers of :meth:`ShortcutAnalysis.as_dict`."""
    return pd.DataFrame({k: a.as_dict() for k, a in analyses.items()}).T


def world_shortcuts(spec: Any, *, k_folds: int = 5) -> dict[str, ShortcutAnalysis]:
    """:func:`reward_shortcut` of the training split of every world of an ablation grid ``spec`` (a
    :class:`v3kit.ablate.grid.GridSpec`: its ``training_split(world)`` is the split every run of the world trains
    on)."""
    return {w: reward_shortcut(spec.training_split(w), k_folds=k_folds) for w in spec.world_names()}
