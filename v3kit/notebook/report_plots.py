"""Figures for the ablation report (notebook 04): forest plots, training curves, sweeps, world knobs.

Every function takes the frames that :mod:`v3kit.ablate` produces and returns a plain matplotlib ``Figure`` (show it with
:func:`v3kit.notebook.plots.show`); nothing
here computes a statistic that :func:`v3kit.ablate.summarize` does not already hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ..ablate import BASE_WORLD, KEY_METRICS, METRIC_DIRECTION, GridSpec
from ..config import parse_override

_COLORS = {"better": "tab:green", "worse": "tab:red", "n.s.": "tab:gray", "": "tab:gray"}


def _subplots(nrows: int, ncols: int, *, figsize: tuple[float, float], **kwargs: Any) -> tuple[Any, Any]:
    """A plain ``Figure`` and its axes (the one plotting style of :mod:`v3kit.notebook.plots`: no pyplot state)."""
    from matplotlib.figure import Figure  # imported lazily: the CLI and tests of the ablation need no matplotlib

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def _present(metrics: Sequence[str], have: Any) -> list[str]:
    """The metrics the results hold (real data has no ``utility@1``): a plot never shows an empty panel."""
    have = set(have)
    out = [m for m in metrics if m in have]
    if not out:
        raise ValueError(f"none of the metrics {list(metrics)} is in the results (they have {sorted(have)})")
    return out


def forest_plot(
    summary: pd.DataFrame,
    metrics: Sequence[str] = KEY_METRICS,
    *,
    world: str = BASE_WORLD,
    variants: Sequence[str] | None = None,
    against: str = "sft",
    title: str | None = None,
) -> Any:
    """One panel per metric: each variant's paired difference to SFT (``against="sft"``) or to the grid's reference
    (``"reference"``) with its 95% CI; green/red = significantly better/worse, grey = interval contains 0."""
    s = summary[summary["world"] == world]
    metrics = _present(metrics, s["metric"])
    order = list(variants) if variants is not None else list(dict.fromkeys(s["variant"]))
    col, lo, hi, verdict = (
        ("diff", "diff_low", "diff_high", "verdict")
        if against == "sft"
        else ("vs_ref", "vs_ref_low", "vs_ref_high", "vs_ref_verdict")
    )
    if col not in s.columns:
        raise ValueError(f"summary has no {col!r} column; summarize(..., reference=...) adds the reference columns")
    fig, axes = _subplots(
        1, len(metrics), figsize=(4.2 * len(metrics), 0.28 * len(order) + 1.4), sharey=True, squeeze=False
    )
    y = np.arange(len(order))[::-1]
    for ax, m in zip(axes[0], metrics):
        sm = s[s["metric"] == m].set_index("variant").reindex(order)
        for yi, (_, r) in zip(y, sm.iterrows()):
            if pd.isna(r[col]):
                continue
            c = _COLORS.get(r[verdict], "tab:gray")
            ax.plot([r[lo], r[hi]], [yi, yi], color=c, lw=2)
            ax.plot(r[col], yi, "o", color=c, ms=5)
        ax.axvline(0, color="black", lw=0.8)
        ref_name = "SFT" if against == "sft" else summary.attrs.get("reference", "reference")
        arrow = {1: "(higher is better)", -1: "(lower is better)", 0: ""}[METRIC_DIRECTION.get(m, 0)]
        ax.set_title(f"{m} - {ref_name} {arrow}", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(y, order, fontsize=8)
    fig.suptitle(
        title
        or f"Effect of each variant vs {'SFT' if against == 'sft' else 'the reference'} "
        f"(world {world!r}, mean and 95% CI)",
        fontsize=11,
    )
    fig.tight_layout()
    return fig


def _rce_epochs(frame: pd.DataFrame) -> pd.Series:
    """Number of RCE epochs of each (variant, seed) run, from its validation rows."""
    rce = frame[(frame["split"] == "val") & (frame["stage"] == "rce")]
    return rce.groupby(["variant", "seed"])["epoch"].max()


def curves_plot(
    frame: pd.DataFrame,
    variants: Sequence[str],
    metrics: Sequence[str] = ("acc@1", "reward@1", "utility@1", "kl_to_sft"),
    *,
    world: str = BASE_WORLD,
    stage: str | None = None,
    mark: float | None = None,
) -> Any:
    """Held-out validation curves (mean over seeds, band = min..max) of some variants; x = epochs after SFT (RCE
    then GRPO) or, with ``stage="grpo"``, GRPO epochs only. ``mark`` draws a vertical line (e.g. the seed's 8)."""
    val = frame[(frame["split"] == "val") & (frame["world"] == world) & frame["variant"].isin(variants)].copy()
    if stage is not None:
        val = val[val["stage"] == stage]
        val["x"] = val["epoch"]
    else:
        # GRPO epochs continue after RCE's; GRPO's epoch 0 is the same model as RCE's last epoch, so it is dropped
        # unless the run had no RCE.
        r = _rce_epochs(val).rename("rce_epochs")
        val = val.join(r, on=["variant", "seed"])
        val["rce_epochs"] = val["rce_epochs"].fillna(0)
        grpo = val["stage"] == "grpo"
        val = val[~(grpo & (val["epoch"] == 0) & (val["rce_epochs"] > 0))]
        val["x"] = val["epoch"] + np.where(val["stage"] == "grpo", val["rce_epochs"], 0)
    metrics = _present(metrics, [c for c in val.columns if val[c].notna().any()])
    fig, axes = _subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for v in variants:
            g = val[val["variant"] == v].groupby("x")[m]
            if g.ngroups == 0:
                continue
            mean, lo, hi = g.mean(), g.min(), g.max()
            (line,) = ax.plot(mean.index, mean.values, marker=".", label=v)
            ax.fill_between(mean.index, lo.values, hi.values, color=line.get_color(), alpha=0.15)
            if stage is None:
                r = val[(val["variant"] == v) & (val["stage"] == "rce")]["x"].max()
                if pd.notna(r) and r > 0:
                    ax.axvline(r, color=line.get_color(), ls=":", lw=0.8)
        if mark is not None:
            ax.axvline(mark, color="black", ls="--", lw=0.8)
        ax.set_title(f"val {m}", fontsize=10)
        ax.set_xlabel("GRPO epoch" if stage == "grpo" else "epoch after SFT (RCE, then GRPO; dotted = switch)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def train_curves_plot(
    run_dirs: Mapping[str, str | Path],
    columns: Sequence[str] = ("loss", "ratio_max", "clip_ratio", "kl", "entropy"),
    *,
    stage: str = "grpo",
    smooth: int = 10,
) -> Any:
    """Per-step training logs (``metrics.csv``) of one stage for a few runs, side by side (rolling mean)."""
    fig, axes = _subplots(1, len(columns), figsize=(3.6 * len(columns), 3.0), squeeze=False)
    for label, rd in run_dirs.items():
        df = pd.read_csv(Path(rd) / "metrics.csv")
        tr = df[(df["stage"] == stage) & (df["split"] == "train")]
        for ax, c in zip(axes[0], columns):
            if c in tr.columns and tr[c].notna().any():
                ax.plot(tr["step"], tr[c].rolling(smooth, min_periods=1).mean(), label=label)
    for ax, c in zip(axes[0], columns):
        ax.set_title(f"{stage} {c}", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def sweep_plot(
    summary: pd.DataFrame,
    spec: GridSpec,
    key: str,
    variants: Sequence[str],
    metrics: Sequence[str] = KEY_METRICS,
    *,
    world: str = BASE_WORLD,
) -> Any:
    """Difference to SFT (95% CI) against the value of config ``key`` across ``variants`` (e.g. a kl_beta sweep)."""
    xs = {v: spec.value(v, key, world) for v in variants}
    s = summary[(summary["world"] == world) & summary["variant"].isin(variants)]
    metrics = _present(metrics, s["metric"])
    fig, axes = _subplots(1, len(metrics), figsize=(4 * len(metrics), 3.0), squeeze=False)
    positive = [x for x in xs.values() if x > 0]
    symlog = bool(positive) and min(xs.values()) >= 0 and max(xs.values()) / min(positive) > 20
    for ax, m in zip(axes[0], metrics):
        sm = s[s["metric"] == m].assign(x=lambda d: d["variant"].map(xs)).sort_values("x")
        ax.errorbar(
            sm["x"], sm["diff"], yerr=[sm["diff"] - sm["diff_low"], sm["diff_high"] - sm["diff"]], marker="o", capsize=3
        )
        for _, r in sm.iterrows():
            ax.annotate(r["variant"], (r["x"], r["diff"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axhline(0, color="black", lw=0.8)
        if symlog:
            ax.set_xscale("symlog", linthresh=min(positive))
        ax.set_xlabel(key)
        ax.set_title(f"{m} - SFT", fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def world_knobs(spec: GridSpec) -> dict[str, dict[str, Any]]:
    """``{knob key: {world name: value}}`` for worlds that change one config key (the base world included at its
    base value), from the grid's ``worlds.levels``."""
    knobs: dict[str, dict[str, Any]] = {}
    if spec.worlds is None:
        return knobs
    base = spec.base_config()
    for world, overrides in spec.worlds.levels.items():
        if len(overrides) != 1:
            continue  # a multi-key world has no single axis; it still appears in the summary
        keys, value = parse_override(overrides[0])
        knob = ".".join(keys)
        if knob not in knobs:
            node: Any = base
            for k in keys:
                node = getattr(node, k)
            knobs[knob] = {BASE_WORLD: node}
        knobs[knob][world] = value
    return knobs


def world_plot(
    summary: pd.DataFrame,
    spec: GridSpec,
    variants: Sequence[str] | None = None,
    metrics: Sequence[str] = KEY_METRICS,
) -> Any:
    """Rows = world knobs (e.g. reward_bias, reward_noise), columns = metrics: each variant's difference to its
    world's own SFT (95% CI) against the knob's value. Above 0 the variant helps in that world, below it hurts."""
    knobs = world_knobs(spec)
    if not knobs:
        raise ValueError("the grid has no single-key worlds to plot; add 'worlds.levels' to the grid")
    if variants is None:
        variants = [v for v in dict.fromkeys(summary[summary["world"] != BASE_WORLD]["variant"])]
    metrics = _present(metrics, summary["metric"])
    fig, axes = _subplots(len(knobs), len(metrics), figsize=(4 * len(metrics), 3.0 * len(knobs)), squeeze=False)
    for row, (knob, values) in zip(axes, knobs.items()):
        for ax, m in zip(row, metrics):
            for i, v in enumerate(variants):
                pts = summary[
                    (summary["variant"] == v) & (summary["metric"] == m) & summary["world"].isin(values)
                ].assign(x=lambda d, values=values: d["world"].map(values))
                pts = pts.sort_values("x")
                if pts.empty:
                    continue
                jitter = (i - (len(variants) - 1) / 2) * 0.01 * (max(values.values()) - min(values.values()) or 1)
                ax.errorbar(
                    pts["x"] + jitter,
                    pts["diff"],
                    yerr=[pts["diff"] - pts["diff_low"], pts["diff_high"] - pts["diff"]],
                    marker="o",
                    capsize=3,
                    label=v,
                )
            ax.axhline(0, color="black", lw=0.8)
            ax.axvline(values[BASE_WORLD], color="gray", ls=":", lw=0.8)
            ax.set_xlabel(f"{knob} (dotted: default world)")
            ax.set_title(f"{m} - SFT of that world", fontsize=10)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def step0_table(frame: pd.DataFrame, variants: Sequence[str] | None = None, world: str = BASE_WORLD) -> pd.DataFrame:
    """GRPO step-0 ratio statistics per variant (mean over seeds): how far from 1 GRPO starts, and how much of the
    batch the clip range already excludes."""
    cols = [
        c
        for c in ("step0_ratio_mean", "step0_ratio_min", "step0_ratio_max", "step0_outside_clip")
        if c in frame.columns
    ]
    t = frame[(frame["world"] == world) & (frame["split"] == "test") & (frame["stage"] == "grpo")]
    if variants is not None:
        t = t[t["variant"].isin(variants)]
    out = t.groupby("variant", sort=False)[cols].mean()
    return out.reindex([v for v in (variants or out.index) if v in out.index])


def shortcut_plot(analyses: Mapping[str, Any], *, title: str | None = None) -> Any:
    """The reward shortcut analysis (:mod:`v3kit.data.shortcut`) of named datasets or runs, side by side: the share of
    the within-group reward variance that candidate features alone explain; acc@1 of ranking by that
    query-independent part vs by the reward itself; and, where a policy's change from SFT is known, its correlation
    with each part and with the label."""
    names = list(analyses)
    has_change = any(a.corr_change_shortcut is not None for a in analyses.values())
    fig, axes = _subplots(1, 3 if has_change else 2, figsize=(4.2 * (3 if has_change else 2), 3.2), squeeze=False)
    ax = axes[0]
    x = np.arange(len(names))
    share = [min(max(analyses[n].explained_share, 0.0), 1.0) for n in names]  # cross-fitted: may dip below 0
    ax[0].bar(x, share, color="tab:orange", label="query-independent")
    ax[0].bar(x, [1 - s for s in share], bottom=share, color="tab:blue", alpha=0.5, label="query-dependent")
    ax[0].set_title("within-group reward variance", fontsize=10)
    ax[0].set_ylim(0, 1)
    ax[0].legend(fontsize=8)
    w = 0.38
    ax[1].bar(
        x - w / 2,
        [analyses[n].acc_shortcut for n in names],
        w,
        color="tab:orange",
        label="rank by query-independent part",
    )
    ax[1].bar(x + w / 2, [analyses[n].acc_reward for n in names], w, color="tab:gray", label="rank by reward")
    ax[1].set_title("acc@1 (label) of each ranking", fontsize=10)
    ax[1].legend(fontsize=8)
    if has_change:
        parts = (
            ("corr_change_shortcut", "query-independent", "tab:orange"),
            ("corr_change_rest", "query-dependent", "tab:blue"),
            ("corr_change_label", "label", "tab:green"),
        )
        w3 = 0.27
        for i, (attr, label, color) in enumerate(parts):
            vals = [getattr(analyses[n], attr) if getattr(analyses[n], attr) is not None else np.nan for n in names]
            ax[2].bar(x + (i - 1) * w3, vals, w3, color=color, label=label)
        ax[2].axhline(0, color="black", lw=0.8)
        ax[2].set_ylim(-1, 1)
        ax[2].set_title("corr(policy - SFT logit change, part)", fontsize=10)
        ax[2].legend(fontsize=8)
    for a in ax:
        a.set_xticks(x, names, fontsize=8, rotation=20)
        a.grid(axis="y", alpha=0.3)
    fig.suptitle(title or "Reward shortcut: what any query would pay for a candidate", fontsize=11)
    fig.tight_layout()
    return fig
