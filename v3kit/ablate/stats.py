"""Statistics of a grid: two-level (seeds x test queries) bootstrap intervals of paired differences."""

from __future__ import annotations

import functools
import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .grid import BASE_WORLD, KEY_METRICS, METRIC_DIRECTION


@functools.lru_cache(maxsize=8)
def _two_level_draws(seed: int, n_boot: int, S: int, Q: int) -> tuple[np.ndarray, np.ndarray]:
    """The replicates' seed draws ``[n_boot, S]`` and query draw counts ``[n_boot, Q]``; cached because every
    (variant, metric) of a summary with the same shape uses the same draws (a pure function of its arguments)."""
    rng = np.random.default_rng(seed)
    s_idx = rng.integers(0, S, (n_boot, S))
    q_idx = rng.integers(0, Q, (n_boot, Q))
    flat = (np.arange(n_boot)[:, None] * Q + q_idx).ravel()
    counts = np.bincount(flat, minlength=n_boot * Q).reshape(n_boot, Q).astype(float)
    s_idx.flags.writeable = counts.flags.writeable = False
    return s_idx, counts


def bootstrap_mean_ci(x: np.ndarray, *, n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``x`` (1-D: resample its entries) or of the grand mean of ``x``
    (2-D ``[runs, queries]``: a two-level bootstrap, see :func:`summarize`).

    Exact recipe (tests replicate it): ``rng = np.random.default_rng(seed)``; 1-D:
    ``idx = rng.integers(0, n, (n_boot, n))``, statistic ``x[idx].mean(1)``; 2-D: ``s = rng.integers(0, S,
    (n_boot, S))`` then ``q = rng.integers(0, Q, (n_boot, Q))``, statistic ``mean_j mean_k x[s[b, j], q[b, k]]``;
    the interval is ``np.quantile(stats, [(1 - ci) / 2, (1 + ci) / 2])``.
    """
    x = np.asarray(x, dtype=float)
    lo_q, hi_q = (1 - ci) / 2, (1 + ci) / 2
    if x.size == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(_bootstrap_stats(x, n_boot, seed), [lo_q, hi_q])
    return float(lo), float(hi)


def _bootstrap_stats(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """The ``n_boot`` replicates of :func:`bootstrap_mean_ci` (its exact recipe)."""
    if x.ndim == 1:
        n = len(x)
        stats = x[np.random.default_rng(seed).integers(0, n, (n_boot, n))].mean(axis=1)
    elif x.ndim == 2:
        S, Q = x.shape
        s_idx, counts = _two_level_draws(seed, n_boot, S, Q)
        # per_run[s, b]: run s's mean over replicate b's query draw; then average replicate b's seed draw.
        per_run = (counts @ x.T).T / Q
        stats = per_run[s_idx, np.arange(n_boot)[:, None]].mean(axis=1)
    else:
        raise ValueError(f"x must be 1-D (runs) or 2-D (runs x queries), got shape {x.shape}")
    return stats


def bootstrap_p_value(x: np.ndarray, *, n_boot: int = 2000, seed: int = 0) -> float:
    """Two-sided bootstrap p-value of "the mean of ``x`` is 0", from the replicates of :func:`bootstrap_mean_ci`
    (same ``seed``: the same draws): ``min(1, 2 * min(#(stat <= 0) + 1, #(stat >= 0) + 1) / (n_boot + 1))``. The
    +1 keeps it above 0 (no p-value below 1 / (n_boot + 1) can be read off n_boot replicates); an all-zero ``x``
    (a variant identical to its reference) gets 1."""
    x = np.asarray(x, dtype=float)
    if x.size == 0:
        return math.nan
    stats = _bootstrap_stats(x, n_boot, seed)
    tail = min(int((stats <= 0).sum()), int((stats >= 0).sum())) + 1
    return float(min(1.0, 2 * tail / (n_boot + 1)))


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (Holm 1979), in the input's order: sort ascending, multiply the i-th
    smallest (0-based) by ``m - i``, take the running maximum, cap at 1. Rejecting where the adjusted p < alpha
    keeps the family-wise error rate of the m comparisons at alpha. NaN stays NaN and does not count in m."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, math.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


# A percentile bootstrap over a handful of runs is roughly [min, max] of the runs: on null differences with 3 seeds
# it calls ~24% of them significant. Seeds-only intervals therefore get a verdict only from this many runs on.
MIN_RUNS_FOR_SEEDS_ONLY_VERDICT = 10


# z of a two-sided 5% test plus z of 80% power (1.96 + 0.84): an effect of 2.8 standard errors is detected 80% of the
# time. The standard error is read off the bootstrap CI: half-width / 1.96 (for a 95% interval).
MDE_Z = 2.8


def min_detectable_effect(lo: float, hi: float, ci: float = 0.95) -> float:
    """Smallest true difference this design detects with 80% power at the 5% level, from a CI ``[lo, hi]``."""
    from statistics import NormalDist

    if not (np.isfinite(lo) and np.isfinite(hi)):
        return math.nan
    se = (hi - lo) / 2 / NormalDist().inv_cdf((1 + ci) / 2)
    return MDE_Z * se


def _verdict(lo: float, hi: float, direction: int, method: str = "seeds x queries", n_runs: int = 0) -> str:
    if not (np.isfinite(lo) and np.isfinite(hi)) or direction == 0:
        return ""
    if method == "seeds" and n_runs < MIN_RUNS_FOR_SEEDS_ONLY_VERDICT:
        return ""
    if lo > 0:
        return "better" if direction > 0 else "worse"
    if hi < 0:
        return "worse" if direction > 0 else "better"
    return "n.s."


class _PerQuery:
    """Per-query outcome matrices ``[seeds, queries]`` by (world, variant, stage, metric), built once."""

    def __init__(self, pq: pd.DataFrame | None) -> None:
        self.groups: dict[tuple[str, str, str], pd.DataFrame] = {}
        if pq is not None and not pq.empty:
            for key, grp in pq.groupby(["world", "variant", "stage"], sort=False):
                self.groups[key] = grp.set_index(["seed", "query"]).sort_index()
        self.cache: dict[tuple[str, str, str, str], pd.DataFrame | None] = {}

    def matrix(self, world: str, variant: str, stage: str, metric: str) -> pd.DataFrame | None:
        key = (world, variant, stage, metric)
        if key not in self.cache:
            grp = self.groups.get((world, variant, stage))
            mat = grp[metric].unstack("query") if grp is not None and metric in grp.columns else None
            if mat is not None:
                # Queries undefined for every run (ndcg@5 of all-equal rewards) carry nothing to compare.
                mat = mat.dropna(axis=1, how="all")
            self.cache[key] = mat if mat is not None and mat.size and mat.notna().all().all() else None
        return self.cache[key]


def _paired(
    pq: _PerQuery, final: pd.DataFrame, world: str, a: str, b: str | None, metric: str, stage: str = "grpo"
) -> tuple[np.ndarray, str]:
    """The paired difference ``a - b`` per run (b=None: a's own SFT), as [runs, queries] when per-query outcomes
    exist for the metric, else [runs]; and the name of the method. ``stage``: which model of a run is its final
    one (``grpo``: the end of the pipeline; ``selected``: the model ``select`` kept)."""
    a_mat = pq.matrix(world, a, stage, metric)
    b_mat = pq.matrix(world, a, "sft", metric) if b is None else pq.matrix(world, b, stage, metric)
    if a_mat is not None and b_mat is not None:
        seeds = a_mat.index.intersection(b_mat.index)
        if len(seeds):
            return (a_mat.loc[seeds] - b_mat.loc[seeds]).to_numpy(), "seeds x queries"
    fa = final[(final["world"] == world) & (final["variant"] == a)].set_index("seed")
    if b is None:
        return (fa[metric] - fa[f"sft_{metric}"]).dropna().to_numpy(), "seeds"
    fb = final[(final["world"] == world) & (final["variant"] == b)].set_index("seed")
    seeds = fa.index.intersection(fb.index)
    return (fa.loc[seeds, metric] - fb.loc[seeds, metric]).dropna().to_numpy(), "seeds"


def _final_table(frame: pd.DataFrame, stage: str = "grpo") -> pd.DataFrame:
    """One row per run: the final (``stage``: after GRPO, or the selected model) test metrics plus ``sft_<metric>``
    of the same run's SFT row."""
    test = frame[frame["split"] == "test"]
    keys = ["world", "variant", "seed"]
    final = test[test["stage"] == stage].set_index(keys)
    sft = test[test["stage"] == "sft"].set_index(keys)
    metrics = [m for m in METRIC_DIRECTION if m in final.columns]
    out = final[metrics].join(sft[metrics].add_prefix("sft_"))
    return out.reset_index()


def summarize(
    frame: pd.DataFrame,
    per_query: pd.DataFrame | None = None,
    *,
    metrics: Sequence[str] | None = None,
    reference: str | None = None,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    stage: str = "grpo",
) -> pd.DataFrame:
    """Mean and bootstrap CI of every final test metric per (world, variant), the paired difference to SFT with its
    CI and verdict, and (with ``reference``) the paired difference to the reference variant.

    Pairing: each run's final metric minus the *same* SFT checkpoint's metric (on the same test queries); against
    the reference, run seed ``k`` of the variant minus seed ``k`` of the reference (same batch-order seed).
    With ``per_query`` the CI is a two-level bootstrap (resample seeds, then test queries, shared across the
    drawn seeds because all runs of a world share the test set); without it (or for ``ndcg@5``) seeds only.
    ``verdict`` is ``better``/``worse`` when the CI excludes 0 (direction from :data:`METRIC_DIRECTION`),
    else ``n.s.``; a seeds-only CI from fewer than :data:`MIN_RUNS_FOR_SEEDS_ONLY_VERDICT` runs gets no verdict
    (``""``), because a percentile bootstrap over 3 runs is about [min, max] and calls noise significant.
    """
    final = _final_table(frame, stage)
    # a metric the data does not have (utility@1 on real data) is left out rather than summarised as NaN
    metrics = [m for m in (metrics or METRIC_DIRECTION) if m in final.columns and final[m].notna().any()]
    pq = _PerQuery(per_query)
    rows = []
    for (world, variant), grp in final.groupby(["world", "variant"], sort=False):
        for m in metrics:
            d = METRIC_DIRECTION[m]
            vals, method = _paired(pq, final, world, variant, None, m, stage)
            level = grp[m].to_numpy(dtype=float)
            level_mat = pq.matrix(world, variant, stage, m)
            level_ci = bootstrap_mean_ci(
                level_mat.to_numpy() if level_mat is not None else level, n_boot=n_boot, ci=ci, seed=seed
            )
            lo, hi = bootstrap_mean_ci(vals, n_boot=n_boot, ci=ci, seed=seed)
            row = {
                "world": world,
                "variant": variant,
                "metric": m,
                "n_seeds": len(grp),
                "mean": level.mean(),
                "ci_low": level_ci[0],
                "ci_high": level_ci[1],
                "sft": grp[f"sft_{m}"].mean(),
                "diff": float(np.mean(vals)) if np.size(vals) else math.nan,
                "diff_low": lo,
                "diff_high": hi,
                "verdict": _verdict(lo, hi, d, method, len(vals)),
                "ci_method": method,
                "mde": min_detectable_effect(lo, hi, ci),
                "n_queries": int(np.shape(vals)[1]) if np.ndim(vals) == 2 else 0,
            }
            if reference is not None:
                if variant == reference:
                    row.update(vs_ref=0.0, vs_ref_low=0.0, vs_ref_high=0.0, vs_ref_verdict="")
                elif (final["variant"] == reference).any():
                    rv, rmethod = _paired(pq, final, world, variant, reference, m, stage)
                    rlo, rhi = bootstrap_mean_ci(rv, n_boot=n_boot, ci=ci, seed=seed)
                    row.update(
                        vs_ref=float(np.mean(rv)) if np.size(rv) else math.nan,
                        vs_ref_low=rlo,
                        vs_ref_high=rhi,
                        vs_ref_verdict=_verdict(rlo, rhi, d, rmethod, len(rv)),
                    )
            rows.append(row)
    out = pd.DataFrame(rows)
    if reference is not None and not out.empty:
        out.attrs["reference"] = reference
    if "reward_label_agreement" in frame.columns:
        agreement = frame.groupby("world")["reward_label_agreement"].mean().dropna()
        out.attrs["reward_label_agreement"] = {str(w): float(v) for w, v in agreement.items()}
    return out


def compare(
    frame: pd.DataFrame,
    per_query: pd.DataFrame | None,
    pairs: Mapping[str, tuple[str, str]],
    *,
    metrics: Sequence[str] = KEY_METRICS,
    world: str = BASE_WORLD,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    stage: str = "grpo",
) -> pd.DataFrame:
    """Paired differences ``a - b`` (with CI and verdict) for named pairs of variants, e.g. the grid's questions."""
    final = _final_table(frame, stage)
    pq = _PerQuery(per_query)
    rows = []
    for question, (a, b) in pairs.items():
        for m in metrics:
            if m not in final.columns:
                continue
            vals, method = _paired(pq, final, world, a, b, m, stage)
            lo, hi = bootstrap_mean_ci(vals, n_boot=n_boot, ci=ci, seed=seed)
            rows.append(
                {
                    "question": question,
                    "a": a,
                    "b": b,
                    "metric": m,
                    "diff": float(np.mean(vals)) if np.size(vals) else math.nan,
                    "low": lo,
                    "high": hi,
                    "verdict": _verdict(lo, hi, METRIC_DIRECTION[m], method, len(vals)),
                    "ci_method": method,
                }
            )
    return pd.DataFrame(rows)


def paired_values(
    frame: pd.DataFrame,
    per_query: pd.DataFrame | None,
    a: str,
    b: str,
    metric: str,
    *,
    world: str = BASE_WORLD,
    stage: str = "grpo",
) -> np.ndarray:
    """The paired differences ``a - b`` that :func:`compare` bootstraps (``[runs, queries]`` where per-query
    outcomes exist, else ``[runs]``): for a p-value (:func:`bootstrap_p_value`) or the per-seed effects."""
    return _paired(_PerQuery(per_query), _final_table(frame, stage), world, a, b, metric, stage)[0]
