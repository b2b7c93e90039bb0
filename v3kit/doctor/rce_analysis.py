"""Did RCE learn? Its loss floor H(targets) under the annealed temperature, and a plateau check on a loss curve.

The verdict "did RCE converge" has one home, the doctor's ``rce_converged`` check (``v3kit/doctor/``), which
notebook 02 shows; this module holds the curves it and the live plot read.

The raw RCE loss falls as the temperature anneals even when the policy learns nothing (sharper targets have lower
entropy); ``loss - H(targets)`` = KL(targets || policy) is the part training reduces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ..data.contract import GroupData
from ..train.losses import rce_targets


def rce_target_entropy(
    train: GroupData, reward_temperature: float, label_weight: float = 0.0, reward_norm: str = "none"
) -> float:
    """Mean entropy of RCE's target distribution over ``train`` at a reward temperature: the lowest loss any
    policy can reach. As T anneals down the targets sharpen and this floor drops, so the raw RCE loss falls even
    when the policy learns nothing; ``loss - H(targets)`` (= KL(targets || policy)) is what training reduces."""
    t = rce_targets(
        train.labels,
        train.rewards,
        reward_temperature,
        mask=train.mask,
        label_weight=label_weight,
        reward_norm=reward_norm,
    )
    plogp = torch.where(train.mask & (t > 0), t * torch.log(t.clamp_min(1e-30)), torch.zeros_like(t))
    return float(-plogp.sum(dim=1).mean())


def rce_floor(train: GroupData, rce_cfg: Any) -> Callable[[dict[str, Any]], dict[str, float]]:
    """``extras`` for :class:`LivePlot`: adds ``target_entropy`` and ``excess_loss`` to each RCE step row."""
    cache: dict[float, float] = {}

    def extras(row: dict[str, Any]) -> dict[str, float]:
        temp = rce_cfg.temperatures(float(row.get("temperature", rce_cfg.t_start)), 1.0)[0]  # the targets' T
        key = round(float(temp), 4)
        if key not in cache:
            cache[key] = rce_target_entropy(train, key, rce_cfg.label_weight, getattr(rce_cfg, "reward_norm", "none"))
        return {"target_entropy": cache[key], "excess_loss": float(row["loss"]) - cache[key]}

    return extras


def add_rce_floor(history: pd.DataFrame, train: GroupData, rce_cfg: Any) -> pd.DataFrame:
    """RCE train rows with ``target_entropy`` and ``excess_loss`` columns (see :func:`rce_floor`)."""
    extras = rce_floor(train, rce_cfg)
    rows = history[history["split"] == "train"] if "split" in history.columns else history
    return rows.assign(**pd.DataFrame([extras(r) for r in rows.to_dict("records")], index=rows.index))


@dataclass
class PlateauCheck:
    """Is a loss curve still falling? Compares the mean of the last ``k`` values with the ``k`` before."""

    previous_mean: float
    last_mean: float
    rel_change: float  # (last - previous) / |previous|
    k: int
    rel_tol: float
    status: str  # "falling" | "plateau" | "rising" | "too short"

    @property
    def still_falling(self) -> bool:
        return self.status == "falling"

    def __str__(self) -> str:
        if self.status == "too short":
            return f"too few values ({self.k}) to judge a plateau"
        return (
            f"mean of last {self.k} steps {self.last_mean:.4f} vs previous {self.k} {self.previous_mean:.4f}: "
            f"{self.rel_change:+.2%} -> {self.status} (threshold +-{self.rel_tol:.1%})"
        )


def plateau_check(
    values: Sequence[float] | np.ndarray | pd.Series, k: int | None = None, rel_tol: float = 0.01
) -> PlateauCheck:
    """``falling`` if the last ``k`` values average more than ``rel_tol`` (relative) below the ``k`` before them,
    ``rising`` if more than ``rel_tol`` above, else ``plateau``. ``k`` defaults to a quarter of the curve (>= 1),
    so the check looks at the recent trend rather than at the whole run."""
    v = np.asarray(pd.Series(values, dtype=float).dropna())
    if k is None:
        k = max(1, len(v) // 4)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(v) < 2 * k:
        return PlateauCheck(math.nan, math.nan, math.nan, len(v), rel_tol, "too short")
    prev, last = float(v[-2 * k : -k].mean()), float(v[-k:].mean())
    rel = (last - prev) / max(abs(prev), 1e-12)
    status = "falling" if rel < -rel_tol else "rising" if rel > rel_tol else "plateau"
    return PlateauCheck(prev, last, rel, k, rel_tol, status)
