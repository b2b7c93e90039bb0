"""Figures of training histories and of stage 1, and how the notebooks display them.

One plotting style everywhere: plain :class:`matplotlib.figure.Figure` objects, never pyplot. Pyplot keeps every
figure in a global registry (a long notebook session leaks them) and the inline backend would show each one a
second time when the cell ends; a ``Figure`` is shown exactly once, by :func:`show` or as a cell's value.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from ..data.contract import GroupData
from ..data.reward_stats import label_reward_rank, reward_spread, stage1_summary

LIVE_ENV = "V3KIT_LIVE"  # "0" forces the headless path (one final figure), "1" forces live updates

# Colours stable across panels: the same metric has the same colour everywhere.
_COLOURS = {
    "loss": "C0",
    "target_entropy": "C7",
    "excess_loss": "C3",
    "temperature": "C1",
    "pg_loss": "C2",
    "kl": "C4",
    "ratio_mean": "C0",
    "clip_ratio": "C3",
    "entropy": "C5",
    "acc@1": "C0",
    "reward@1": "C2",
    "utility@1": "C1",
    "kl_to_sft": "C4",
}


def in_kernel() -> bool:
    """True inside a Jupyter kernel (JupyterLab, or papermill's headless kernel)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def live_default() -> bool:
    """Live updates by default in a kernel; ``V3KIT_LIVE`` overrides either way."""
    env = os.environ.get(LIVE_ENV)
    if env is not None and env.strip() != "":
        return env.strip().lower() not in ("0", "false", "no", "off")
    return in_kernel()


def figure_png(fig: Figure, dpi: int = 80) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def show(fig: Figure, *, dpi: int = 80) -> None:
    """Display ``fig`` as a PNG output in a notebook (no-op outside a kernel)."""
    if in_kernel():
        from IPython.display import Image, display

        display(Image(data=figure_png(fig, dpi)))


@dataclass(frozen=True)
class Panel:
    """One subplot. ``kind``: ``"train"`` (per-step columns, raw + smoothed), ``"band"`` (``keys[0]`` as a line with a
    ``keys[1]``..``keys[2]`` band), ``"eval"`` (held-out metrics per epoch, with the baseline as a dashed line)."""

    title: str
    keys: tuple[str, ...]
    kind: str = "train"
    ylabel: str = ""
    hlines: tuple[float, ...] = ()
    # Shown only when the data has it: once held-out rows exist without any of ``keys`` (real data has no
    # utility@1), the panel is left out instead of staying empty.
    optional: bool = False


SFT_PANELS = (
    Panel("SFT loss (CE on the human label)", ("loss",), ylabel="loss"),
    Panel("held-out acc@1", ("acc@1",), "eval", "acc@1"),
    Panel("held-out reward@1", ("reward@1",), "eval", "reward@1"),
)
RCE_PANELS = (
    Panel("RCE loss and its floor H(targets)", ("loss", "target_entropy"), ylabel="nats"),
    Panel("loss - H(targets) = KL(targets || policy)", ("excess_loss",), ylabel="nats"),
    Panel("reward temperature T", ("temperature",), ylabel="T"),
    Panel("held-out acc@1", ("acc@1",), "eval", "acc@1"),
    Panel("held-out reward@1", ("reward@1",), "eval", "reward@1"),
    Panel("held-out utility@1 (hidden truth)", ("utility@1",), "eval", "utility@1", optional=True),
)


def grpo_panels(eps_low: float = 0.2, eps_high: float | None = None) -> tuple[Panel, ...]:
    eps_high = eps_low if eps_high is None else eps_high
    return (
        Panel("GRPO loss", ("loss",), ylabel="loss"),
        Panel("pg_loss (clipped surrogate)", ("pg_loss",), ylabel="pg_loss"),
        Panel("kl penalty term", ("kl",), ylabel="kl"),
        Panel(
            "ratio: mean, min-max band, clip range",
            ("ratio_mean", "ratio_min", "ratio_max"),
            "band",
            "ratio",
            hlines=(1.0 - eps_low, 1.0 + eps_high),
        ),
        Panel("clip_ratio", ("clip_ratio",), ylabel="fraction clipped"),
        Panel("policy entropy", ("entropy",), ylabel="nats"),
        Panel("held-out acc@1", ("acc@1",), "eval", "acc@1"),
        Panel("held-out reward@1", ("reward@1",), "eval", "reward@1"),
        Panel("held-out utility@1 (hidden truth)", ("utility@1",), "eval", "utility@1", optional=True),
    )


DEFAULT_PANELS: dict[str, tuple[Panel, ...]] = {"sft": SFT_PANELS, "rce": RCE_PANELS, "grpo": grpo_panels()}


def smooth(values: np.ndarray, window: int | None = None) -> np.ndarray:
    """Trailing moving average (window ~ 1/20 of the curve), NaN-tolerant, same length as ``values``."""
    s = pd.Series(values, dtype=float)
    window = window or max(1, len(s) // 20)
    return s.rolling(window, min_periods=1).mean().to_numpy()


def _draw_panel(
    ax: Any,
    panel: Panel,
    train: pd.DataFrame,
    evals: pd.DataFrame,
    baseline: Mapping[str, float] | None,
    epoch_steps: Sequence[int],
    baseline_label: str,
) -> None:
    ax.set_title(panel.title, fontsize=10)
    ax.set_ylabel(panel.ylabel or ", ".join(panel.keys), fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if panel.kind == "eval":
        ax.set_xlabel("epoch", fontsize=9)
        drawn = False
        for key in panel.keys:
            if key in evals.columns and evals[key].notna().any():
                ax.plot(evals["epoch"], evals[key], "o-", color=_COLOURS.get(key), label=f"{key} (held-out)")
                drawn = True
            if baseline is not None and key in baseline and pd.notna(baseline[key]):
                ax.axhline(baseline[key], ls="--", color="k", lw=1, label=f"{baseline_label} {baseline[key]:.3f}")
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="grey")
        else:
            ax.legend(fontsize=7, loc="best")
            ax.xaxis.get_major_locator().set_params(integer=True)
        return
    ax.set_xlabel("step", fontsize=9)
    for s in epoch_steps:  # epoch boundaries: the loss often jumps there (new shuffle, refreshed old policy)
        ax.axvline(s, color="grey", lw=0.5, alpha=0.5)
    present = [k for k in panel.keys if k in train.columns and train[k].notna().any()]
    if not present:
        ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="grey")
        return
    x = train["step"].to_numpy()
    if panel.kind == "band":
        mid, lo, hi = panel.keys
        if lo in train.columns and hi in train.columns:
            ax.fill_between(
                x, train[lo].to_numpy(float), train[hi].to_numpy(float), color="C0", alpha=0.2, label=f"{lo}..{hi}"
            )
        ax.plot(x, train[mid].to_numpy(float), color="C0", lw=1.2, label=mid)
        if (train[hi] > 20).any() or (train[lo] < 0.05).any():
            ax.set_yscale("log")  # a stale old policy puts ratios many orders of magnitude away from 1
    else:
        for key in present:
            y = train[key].to_numpy(float)
            colour = _COLOURS.get(key)
            if key == "target_entropy" or key == "temperature":  # deterministic curves: no smoothing needed
                ax.plot(x, y, color=colour, lw=1.2, ls="--" if key == "target_entropy" else "-", label=key)
                continue
            ax.plot(x, y, color=colour, lw=0.6, alpha=0.35)
            ax.plot(x, smooth(y), color=colour, lw=1.5, label=f"{key} (moving avg)")
    for h in panel.hlines:
        ax.axhline(h, color="k", ls=":", lw=1)
    ax.legend(fontsize=7, loc="best")


def draw_panels(
    fig: Figure,
    panels: Sequence[Panel],
    train: pd.DataFrame,
    evals: pd.DataFrame,
    *,
    baseline: Mapping[str, float] | None = None,
    steps_per_epoch: int | None = None,
    title: str = "",
    baseline_label: str = "SFT baseline",
) -> Figure:
    """(Re)draw ``panels`` on ``fig`` from a stage's train and eval rows."""
    if len(evals):
        panels = [
            p for p in panels if not p.optional or any(k in evals.columns and evals[k].notna().any() for k in p.keys)
        ]
    fig.clear()
    ncols = 2 if len(panels) == 4 else max(1, min(3, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    width, height = 4.4 * ncols, 3.1 * nrows + 0.4
    fig.set_size_inches(width, height)
    # Fixed margins instead of a layout engine: constrained/tight layout double the cost of every redraw.
    axes = fig.subplots(
        nrows,
        ncols,
        squeeze=False,
        gridspec_kw={
            "left": 0.75 / width,
            "right": 1 - 0.15 / width,
            "bottom": 0.5 / height,
            "top": 1 - 0.7 / height,
            "wspace": 0.32,
            "hspace": 0.75 / 3.1 * 1.4,
        },
    ).ravel()
    last = int(train["step"].max()) if "step" in train.columns and len(train) else 0
    epoch_steps = list(range(steps_per_epoch, last, steps_per_epoch)) if steps_per_epoch else []
    for ax, panel in zip(axes, panels):
        _draw_panel(ax, panel, train, evals, baseline, epoch_steps, baseline_label)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def new_figure(layout: str | None = None) -> Figure:
    return Figure(layout=layout)


def plot_stage1(old_log_probs: torch.Tensor, data: GroupData, *, bins: int = 40) -> Figure:
    """Three panels on the training groups: ``old_log_probs`` (all candidates vs the label), per-group reward
    spread, and where the human label ranks by reward (label/reward agreement)."""
    s = stage1_summary(old_log_probs, data)
    fig = new_figure("constrained")
    fig.set_size_inches(14, 3.8)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    valid = old_log_probs[data.mask].numpy()
    label_lp = old_log_probs.gather(1, data.labels.unsqueeze(1)).squeeze(1).numpy()
    edges = np.histogram_bin_edges(valid, bins=bins)
    ax1.hist(valid, bins=edges, color="C0", alpha=0.6, label="all candidates")
    ax1.hist(label_lp, bins=edges, color="C3", alpha=0.6, label="human label")
    ax1.axvline(s["uniform_logp_mean"], color="k", ls="--", lw=1, label="uniform policy (mean)")
    ax1.set(title="old_log_probs (SFT policy, train)", xlabel="log pi_old(c | q)", ylabel="candidates")
    ax1.legend(fontsize=8)

    spread = reward_spread(data).numpy()
    ax2.hist(spread, bins=bins, color="C2")
    ax2.set(
        title=f"per-group reward spread (median std {s['reward_std_median']:.2f})",
        xlabel="std of rewards within the group",
        ylabel="groups",
    )
    ax2.text(
        0.98,
        0.95,
        f"zero-spread groups: {s['frac_zero_spread']:.1%}",
        ha="right",
        va="top",
        transform=ax2.transAxes,
        fontsize=8,
    )

    ranks = label_reward_rank(data).numpy()
    counts = np.bincount(ranks, minlength=data.group_size + 1)[1:]
    ax3.bar(np.arange(1, len(counts) + 1), counts / max(1, len(ranks)), color="C1")
    ax3.set(
        title=f"label is the top-reward candidate in {s['label_is_top_reward']:.0%} of groups",
        xlabel="reward rank of the human label in its group (1 = best)",
        ylabel="fraction of groups",
    )
    ax3.set_xticks(np.arange(1, len(counts) + 1))
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    return fig


def plot_ratio_hist(
    ratios: torch.Tensor | np.ndarray,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    *,
    bins: int = 60,
    title: str = "GRPO step-0 ratio pi_theta / pi_old (train, every candidate)",
) -> Figure:
    """Histogram of the PPO ratio before GRPO's first update, on a log axis, with the clip range shaded."""
    eps_high = eps_low if eps_high is None else eps_high
    r = np.asarray(ratios.detach().cpu() if isinstance(ratios, torch.Tensor) else ratios, dtype=float)
    r = r[np.isfinite(r) & (r > 0)]
    outside = float(((r < 1 - eps_low) | (r > 1 + eps_high)).mean()) if len(r) else math.nan
    fig = new_figure("constrained")
    fig.set_size_inches(8, 3.6)
    ax = fig.subplots()
    lo, hi = (min(r.min(), 1 - eps_low), max(r.max(), 1 + eps_high)) if len(r) else (0.5, 2.0)
    edges = np.geomspace(lo * 0.95, hi * 1.05, bins + 1)
    ax.hist(r, bins=edges, color="C0")
    ax.axvspan(
        1 - eps_low, 1 + eps_high, color="C2", alpha=0.2, label=f"clip range [{1 - eps_low:g}, {1 + eps_high:g}]"
    )
    ax.axvline(1.0, color="k", lw=1)
    ax.set_xscale("log")
    # Plain-number ticks: "10^0" alone says nothing about where the clip range is.
    ticks = [
        t
        for t in (1e-3, 1e-2, 0.1, 0.5, 1 - eps_low, 1.0, 1 + eps_high, 2.0, 10.0, 100.0, 1e3)
        if edges[0] <= t <= edges[-1]
    ]
    ax.set_xticks(sorted(set(ticks)), [f"{t:g}" for t in sorted(set(ticks))])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(
        title=f"{title}\n{outside:.1%} outside the clip range, mean {r.mean():.3f}" if len(r) else title,
        xlabel="ratio (log scale)",
        ylabel="candidates",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig
