"""Live training plots for the notebooks, and the static diagnosis plots they show.

:class:`LivePlot` is a :class:`v3kit.training.Callback`. In a Jupyter kernel it displays one figure per stage and
updates it in place (an ``IPython.display`` handle), redrawing at most once every ``every_steps`` steps *and* at
most once every ``every_seconds`` seconds, and never more often than keeps drawing under ``max_overhead`` of the
wall time; so plotting never dominates training. Headless (no kernel, or ``V3KIT_LIVE=0``) it draws nothing while
training and one static figure at the end of the stage.

Figures are plain :class:`matplotlib.figure.Figure` objects, never pyplot ones: the inline backend would otherwise
show every figure a second time when the cell ends. :func:`show` displays any of them as a PNG.
"""

from __future__ import annotations

import io
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from .data import GroupData
from .losses import rce_targets

LIVE_ENV = "V3KIT_LIVE"  # "0" forces the headless path (one final figure), "1" forces live updates

# Colours stable across panels: the same metric has the same colour everywhere.
_COLOURS = {"loss": "C0", "target_entropy": "C7", "excess_loss": "C3", "temperature": "C1", "pg_loss": "C2",
            "kl": "C4", "ratio_mean": "C0", "clip_ratio": "C3", "entropy": "C5", "acc@1": "C0",
            "reward@1": "C2", "utility@1": "C1", "kl_to_sft": "C4"}


# ----------------------------------------------------------------------------------------------- display
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


# ----------------------------------------------------------------------------------------------- throttling
class Throttle:
    """Decides when a redraw is due: at least ``every_steps`` steps *and* ``every_seconds`` seconds since the last
    one, and at least ``cost * (1 / max_overhead - 1)`` seconds when the last redraw took ``cost`` seconds (so
    drawing takes at most ``max_overhead`` of the time even when a figure is slow to render)."""

    def __init__(self, every_steps: int = 10, every_seconds: float = 1.0, max_overhead: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if every_steps < 1 or every_seconds < 0 or not 0 < max_overhead <= 1:
            raise ValueError("need every_steps >= 1, every_seconds >= 0 and 0 < max_overhead <= 1")
        self.every_steps, self.every_seconds, self.max_overhead = every_steps, every_seconds, max_overhead
        self.clock = clock
        self.reset()

    def reset(self, step: int = 0) -> None:
        self.last_step, self.last_time, self.last_cost = step, self.clock(), 0.0

    def wait_seconds(self) -> float:
        return max(self.every_seconds, self.last_cost * (1.0 / self.max_overhead - 1.0))

    def time_ok(self) -> bool:
        return self.clock() - self.last_time >= self.wait_seconds()

    def ready(self, step: int) -> bool:
        return step - self.last_step >= self.every_steps and self.time_ok()

    def mark(self, step: int, cost: float) -> None:
        """Record a redraw at ``step`` that took ``cost`` seconds."""
        self.last_step, self.last_time, self.last_cost = step, self.clock(), cost


# ----------------------------------------------------------------------------------------------- panels
@dataclass(frozen=True)
class Panel:
    """One subplot. ``kind``: ``"train"`` (per-step columns, raw + smoothed), ``"band"`` (``keys[0]`` as a line with a
    ``keys[1]``..``keys[2]`` band), ``"eval"`` (held-out metrics per epoch, with the baseline as a dashed line)."""

    title: str
    keys: tuple[str, ...]
    kind: str = "train"
    ylabel: str = ""
    hlines: tuple[float, ...] = ()


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
    Panel("held-out utility@1 (hidden truth)", ("utility@1",), "eval", "utility@1"),
)


def grpo_panels(eps_low: float = 0.2, eps_high: float | None = None) -> tuple[Panel, ...]:
    eps_high = eps_low if eps_high is None else eps_high
    return (
        Panel("GRPO loss", ("loss",), ylabel="loss"),
        Panel("pg_loss (clipped surrogate)", ("pg_loss",), ylabel="pg_loss"),
        Panel("kl penalty term", ("kl",), ylabel="kl"),
        Panel("ratio: mean, min-max band, clip range", ("ratio_mean", "ratio_min", "ratio_max"), "band", "ratio",
              hlines=(1.0 - eps_low, 1.0 + eps_high)),
        Panel("clip_ratio", ("clip_ratio",), ylabel="fraction clipped"),
        Panel("policy entropy", ("entropy",), ylabel="nats"),
        Panel("held-out acc@1", ("acc@1",), "eval", "acc@1"),
        Panel("held-out reward@1", ("reward@1",), "eval", "reward@1"),
        Panel("held-out utility@1 (hidden truth)", ("utility@1",), "eval", "utility@1"),
    )


DEFAULT_PANELS: dict[str, tuple[Panel, ...]] = {"sft": SFT_PANELS, "rce": RCE_PANELS, "grpo": grpo_panels()}


def smooth(values: np.ndarray, window: int | None = None) -> np.ndarray:
    """Trailing moving average (window ~ 1/20 of the curve), NaN-tolerant, same length as ``values``."""
    s = pd.Series(values, dtype=float)
    window = window or max(1, len(s) // 20)
    return s.rolling(window, min_periods=1).mean().to_numpy()


def _draw_panel(ax: Any, panel: Panel, train: pd.DataFrame, evals: pd.DataFrame,
                baseline: Mapping[str, float] | None, epoch_steps: Sequence[int], baseline_label: str) -> None:
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
            ax.fill_between(x, train[lo].to_numpy(float), train[hi].to_numpy(float), color="C0", alpha=0.2,
                            label=f"{lo}..{hi}")
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


def draw_panels(fig: Figure, panels: Sequence[Panel], train: pd.DataFrame, evals: pd.DataFrame, *,
                baseline: Mapping[str, float] | None = None, steps_per_epoch: int | None = None,
                title: str = "", baseline_label: str = "SFT baseline") -> Figure:
    """(Re)draw ``panels`` on ``fig`` from a stage's train and eval rows."""
    fig.clear()
    ncols = 2 if len(panels) == 4 else max(1, min(3, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    width, height = 4.4 * ncols, 3.1 * nrows + 0.4
    fig.set_size_inches(width, height)
    # Fixed margins instead of a layout engine: constrained/tight layout double the cost of every redraw.
    axes = fig.subplots(nrows, ncols, squeeze=False, gridspec_kw={
        "left": 0.75 / width, "right": 1 - 0.15 / width, "bottom": 0.5 / height, "top": 1 - 0.7 / height,
        "wspace": 0.32, "hspace": 0.75 / 3.1 * 1.4}).ravel()
    last = int(train["step"].max()) if "step" in train.columns and len(train) else 0
    epoch_steps = list(range(steps_per_epoch, last, steps_per_epoch)) if steps_per_epoch else []
    for ax, panel in zip(axes, panels):
        _draw_panel(ax, panel, train, evals, baseline, epoch_steps, baseline_label)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def _new_figure(layout: str | None = None) -> Figure:
    return Figure(layout=layout)


def plot_history(history: pd.DataFrame, stage: str, *, panels: Sequence[Panel] | None = None,
                 baseline: Mapping[str, float] | str | None = "epoch0", title: str | None = None) -> Figure:
    """Static figure of one stage from ``metrics.csv`` rows (or ``StageResult.history``)."""
    plot = LivePlot(panels=panels, baseline=baseline, live=False, display=False)
    plot.load_history(history, stage)
    plot.redraw(title=title or f"{stage}: {len(plot.train_rows)} steps")
    return plot.figure


# ----------------------------------------------------------------------------------------------- live callback
class LivePlot:
    """Training callback that plots a stage's per-step and per-epoch metrics while it trains.

    ``panels``: per-stage panels (a sequence, or a ``{stage: panels}`` mapping); default :data:`DEFAULT_PANELS`.
    ``baseline``: the held-out metrics drawn as dashed lines (``"epoch0"``: the stage's own first evaluation, i.e.
    the SFT model for RCE; or a mapping such as :func:`v3kit.sft.sft_baseline`'s output; or None).
    ``baseline_label``: legend name of that line (default "SFT baseline", or "epoch 0" for SFT's own start).
    ``extras``: computes derived columns for each train row (e.g. :func:`rce_floor`).
    ``stages``: react only to these stages (the callback may be handed to a pipeline that runs several).
    ``live``: update in place while training (default :func:`live_default`); otherwise one figure at stage end.
    ``display``: publish to the notebook at all (tests turn it off and read ``figure`` / ``redraws``).
    """

    def __init__(
        self,
        panels: Sequence[Panel] | Mapping[str, Sequence[Panel]] | None = None,
        *,
        baseline: Mapping[str, float] | str | None = "epoch0",
        baseline_label: str | None = None,
        extras: Callable[[dict[str, Any]], dict[str, float]] | None = None,
        stages: Collection[str] | None = None,
        every_steps: int = 10,
        every_seconds: float = 1.0,
        max_overhead: float = 0.25,
        live: bool | None = None,
        display: bool = True,
        dpi: int = 80,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.panels_arg = panels
        self.baseline_arg = baseline
        self.baseline_label = baseline_label
        self.extras = extras
        self.stages = None if stages is None else set(stages)
        self.live = live_default() if live is None else live
        self.display = display
        self.dpi = dpi
        self.clock = clock
        self.throttle = Throttle(every_steps, every_seconds, max_overhead, clock)
        self.figure = _new_figure()
        self.redraws = 0
        self.draw_seconds = 0.0
        self._handle: Any = None
        self._active = False
        self.stage = ""
        self.total_steps = 0
        self.steps_per_epoch: int | None = None
        self.epochs: int | None = None
        self.train_rows: list[dict[str, Any]] = []
        self.eval_rows: list[dict[str, Any]] = []
        self._t0 = clock()

    # ---- state
    def panels(self) -> Sequence[Panel]:
        if self.panels_arg is None:
            return DEFAULT_PANELS.get(self.stage, SFT_PANELS)
        if isinstance(self.panels_arg, Mapping):
            return self.panels_arg.get(self.stage, DEFAULT_PANELS.get(self.stage, SFT_PANELS))
        return self.panels_arg

    def baseline(self) -> Mapping[str, float] | None:
        if self.baseline_arg == "epoch0":
            first = [r for r in self.eval_rows if r.get("epoch") == 0]
            return first[0] if first else None
        if isinstance(self.baseline_arg, str):
            raise ValueError(f"baseline must be 'epoch0', a mapping or None, got {self.baseline_arg!r}")
        return self.baseline_arg

    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        train = pd.DataFrame(self.train_rows) if self.train_rows else pd.DataFrame({"step": []})
        evals = pd.DataFrame(self.eval_rows) if self.eval_rows else pd.DataFrame({"epoch": []})
        return train, evals

    def load_history(self, history: pd.DataFrame, stage: str) -> None:
        """Replace the rows with a stage's logged history (what a resumed or reloaded stage shows)."""
        self.stage = stage
        h = history[history["stage"] == stage] if "stage" in history.columns else history
        train = h[h["split"] == "train"].dropna(axis=1, how="all")
        self.train_rows = [self._with_extras(r) for r in train.to_dict("records")]
        self.eval_rows = h[h["split"] == "val"].dropna(axis=1, how="all").to_dict("records")

    def _with_extras(self, row: dict[str, Any]) -> dict[str, Any]:
        return {**row, **self.extras(row)} if self.extras is not None else dict(row)

    def _mine(self, stage: str) -> bool:
        return self.stages is None or stage in self.stages

    # ---- drawing
    def title(self) -> str:
        step = int(self.train_rows[-1]["step"]) if self.train_rows else 0
        epoch = int(self.train_rows[-1]["epoch"]) if self.train_rows else 0
        return (f"{self.stage.upper()}  step {step}/{self.total_steps}  epoch {epoch}/{self.epochs or '?'}  "
                f"({self.clock() - self._t0:.0f} s)")

    def redraw(self, title: str | None = None) -> Figure:
        start = time.perf_counter()
        train, evals = self.frames()
        draw_panels(self.figure, self.panels(), train, evals, baseline=self.baseline(),
                    steps_per_epoch=self.steps_per_epoch, title=self.title() if title is None else title,
                    baseline_label=self.baseline_label or ("epoch 0 (untrained)" if self.stage == "sft"
                                                           else "SFT baseline"))
        self.redraws += 1
        self.draw_seconds += time.perf_counter() - start
        return self.figure

    def _publish(self, final: bool = False) -> None:
        """Send the current figure to the notebook: update the live output in place, or display it once."""
        if not (self.display and in_kernel()):
            return
        from IPython.display import Image, display

        image = Image(data=figure_png(self.figure, self.dpi))
        if self._handle is None:
            self._handle = display(image, display_id=True)
        else:
            self._handle.update(image)

    def _refresh(self, step: int) -> None:
        start = self.clock()
        self.redraw()
        self._publish()
        self.throttle.mark(step, self.clock() - start)

    def finish(self, run_dir: str | os.PathLike[str], stage: str | None = None) -> None:
        """If this plot never drew (its stage was reused, not trained), show the stage's curves from
        ``run_dir/metrics.csv`` once (nothing if none were logged, e.g. for a given checkpoint)."""
        if self.redraws:
            return
        stage = stage or self.stage or (sorted(self.stages)[0] if self.stages else "")
        path = os.path.join(os.fspath(run_dir), "metrics.csv")
        if not stage or not os.path.exists(path):
            return
        history = pd.read_csv(path)
        if not (history["stage"] == stage).any():
            return
        self.load_history(history, stage)
        self.redraw(title=f"{stage.upper()} (logged by an earlier run, reused)")
        self._publish(final=True)

    # ---- Callback hooks
    def on_stage_start(self, stage: str, total_steps: int, info: dict[str, Any]) -> None:
        self._active = self._mine(stage)
        if not self._active:
            return
        self.stage, self.total_steps = stage, total_steps
        self.steps_per_epoch, self.epochs = info.get("steps_per_epoch"), info.get("epochs")
        self.train_rows, self.eval_rows = [], []
        self.figure = _new_figure()
        self._handle = None
        self._t0 = self.clock()
        # No drawing yet: the first redraw waits for the throttle, so a short stage costs one figure in all.
        self.throttle.reset(0)

    def on_step(self, row: dict[str, Any]) -> None:
        if not self._active:
            return
        self.train_rows.append(self._with_extras(row))
        if self.live and self.throttle.ready(int(row["step"])):
            self._refresh(int(row["step"]))

    def on_eval(self, row: dict[str, Any]) -> None:
        if not self._active:
            return
        self.eval_rows.append(dict(row))
        # Evaluations are rare but can be dense in tiny runs: respect the time limit, not the step count.
        if self.live and self.throttle.time_ok():
            self._refresh(int(row.get("step", 0)))

    def on_stage_end(self, stage: str, result: Any) -> None:
        if not self._active:
            return
        self._active = False
        if result is not None and getattr(result, "history", None) is not None and len(result.history):
            self.load_history(result.history, stage)  # the logged history is the truth (also after a resume)
        self.redraw()
        self._publish(final=True)


# ----------------------------------------------------------------------------------------------- RCE's loss floor
def rce_target_entropy(train: GroupData, reward_temperature: float, label_weight: float = 0.0) -> float:
    """Mean entropy of RCE's target distribution over ``train`` at a reward temperature: the lowest loss any
    policy can reach. As T anneals down the targets sharpen and this floor drops, so the raw RCE loss falls even
    when the policy learns nothing; ``loss - H(targets)`` (= KL(targets || policy)) is what training reduces."""
    t = rce_targets(train.labels, train.rewards, reward_temperature, mask=train.mask, label_weight=label_weight)
    plogp = torch.where(train.mask & (t > 0), t * torch.log(t.clamp_min(1e-30)), torch.zeros_like(t))
    return float(-plogp.sum(dim=1).mean())


def rce_floor(train: GroupData, rce_cfg: Any) -> Callable[[dict[str, Any]], dict[str, float]]:
    """``extras`` for :class:`LivePlot`: adds ``target_entropy`` and ``excess_loss`` to each RCE step row."""
    cache: dict[float, float] = {}

    def extras(row: dict[str, Any]) -> dict[str, float]:
        if rce_cfg.temperature_target == "rewards":
            temp = float(row.get("temperature", rce_cfg.t_start))
        else:  # the annealed T divides the logits; the targets keep the fixed reward temperature
            temp = float(rce_cfg.reward_temperature)
        key = round(temp, 4)
        if key not in cache:
            cache[key] = rce_target_entropy(train, key, rce_cfg.label_weight)
        return {"target_entropy": cache[key], "excess_loss": float(row["loss"]) - cache[key]}

    return extras


def add_rce_floor(history: pd.DataFrame, train: GroupData, rce_cfg: Any) -> pd.DataFrame:
    """RCE train rows with ``target_entropy`` and ``excess_loss`` columns (see :func:`rce_floor`)."""
    extras = rce_floor(train, rce_cfg)
    rows = history[history["split"] == "train"] if "split" in history.columns else history
    return rows.assign(**pd.DataFrame([extras(r) for r in rows.to_dict("records")], index=rows.index))


# ----------------------------------------------------------------------------------------------- plateau check
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
        return (f"mean of last {self.k} steps {self.last_mean:.4f} vs previous {self.k} {self.previous_mean:.4f}: "
                f"{self.rel_change:+.2%} -> {self.status} (threshold +-{self.rel_tol:.1%})")


def plateau_check(values: Sequence[float] | np.ndarray | pd.Series, k: int | None = None,
                  rel_tol: float = 0.01) -> PlateauCheck:
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
    prev, last = float(v[-2 * k:-k].mean()), float(v[-k:].mean())
    rel = (last - prev) / max(abs(prev), 1e-12)
    status = "falling" if rel < -rel_tol else "rising" if rel > rel_tol else "plateau"
    return PlateauCheck(prev, last, rel, k, rel_tol, status)


def explain_rce_loss(raw: PlateauCheck, excess: PlateauCheck) -> str:
    """One-line reading of the two plateau checks of the RCE loss (raw, and above the target-entropy floor)."""
    if "too short" in (raw.status, excess.status):
        return "too few RCE steps to judge; run more epochs"
    if excess.still_falling:
        return ("RCE is still fitting its targets (loss above the floor still falling): more RCE epochs should "
                "help.")
    floor = ("the raw loss falls only because the annealed temperature sharpens the targets (their entropy "
             "drops); " if raw.still_falling else "")
    if excess.status == "rising":
        return (f"{floor}the policy falls further behind its sharpening targets (loss above the floor rising): "
                f"raise the lr, add epochs or anneal more slowly.")
    return (f"{floor}the loss above the floor is flat: RCE has converged at this lr; more epochs are unlikely to "
            f"help.")


# ----------------------------------------------------------------------------------------------- stage-1 plots
def label_reward_rank(data: GroupData) -> torch.Tensor:
    """Rank (1 = highest) of the human label's reward within its group, per group; ties count in its favour."""
    r = data.rewards.masked_fill(~data.mask, float("-inf"))
    label_r = r.gather(1, data.labels.unsqueeze(1))
    return 1 + (r > label_r).sum(dim=1)


def label_reward_agreement(data: GroupData) -> float:
    """Fraction of groups whose human label is (one of) the highest-reward candidate(s)."""
    return float((label_reward_rank(data) == 1).float().mean())


def reward_spread(data: GroupData) -> torch.Tensor:
    """Per-group standard deviation of the valid rewards (what GRPO's group normalisation divides by)."""
    m = data.mask.float()
    n = m.sum(1)
    mean = (data.rewards * m).sum(1) / n
    var = (((data.rewards - mean.unsqueeze(1)) ** 2) * m).sum(1) / (n - 1).clamp_min(1)
    return var.sqrt()


def stage1_summary(old_log_probs: torch.Tensor, data: GroupData) -> dict[str, float]:
    """The numbers behind :func:`plot_stage1`."""
    valid = old_log_probs[data.mask]
    label_lp = old_log_probs.gather(1, data.labels.unsqueeze(1)).squeeze(1)
    spread = reward_spread(data)
    return {
        "groups": float(len(data)),
        "old_logp_mean": float(valid.mean()),
        "label_logp_mean": float(label_lp.mean()),
        "uniform_logp_mean": float(-torch.log(data.mask.sum(1).float()).mean()),
        "reward_std_median": float(spread.median()),
        "frac_zero_spread": float((spread < 1e-8).float().mean()),
        "label_is_top_reward": label_reward_agreement(data),
    }


def plot_stage1(old_log_probs: torch.Tensor, data: GroupData, *, bins: int = 40) -> Figure:
    """Three panels on the training groups: ``old_log_probs`` (all candidates vs the label), per-group reward
    spread, and where the human label ranks by reward (label/reward agreement)."""
    s = stage1_summary(old_log_probs, data)
    fig = _new_figure("constrained")
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
    ax2.set(title=f"per-group reward spread (median std {s['reward_std_median']:.2f})",
            xlabel="std of rewards within the group", ylabel="groups")
    ax2.text(0.98, 0.95, f"zero-spread groups: {s['frac_zero_spread']:.1%}", ha="right", va="top",
             transform=ax2.transAxes, fontsize=8)

    ranks = label_reward_rank(data).numpy()
    counts = np.bincount(ranks, minlength=data.group_size + 1)[1:]
    ax3.bar(np.arange(1, len(counts) + 1), counts / max(1, len(ranks)), color="C1")
    ax3.set(title=f"label is the top-reward candidate in {s['label_is_top_reward']:.0%} of groups",
            xlabel="reward rank of the human label in its group (1 = best)", ylabel="fraction of groups")
    ax3.set_xticks(np.arange(1, len(counts) + 1))
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    return fig


def plot_ratio_hist(ratios: torch.Tensor | np.ndarray, eps_low: float = 0.2, eps_high: float | None = None, *,
                    bins: int = 60, title: str = "GRPO step-0 ratio pi_theta / pi_old (train, every candidate)"
                    ) -> Figure:
    """Histogram of the PPO ratio before GRPO's first update, on a log axis, with the clip range shaded."""
    eps_high = eps_low if eps_high is None else eps_high
    r = np.asarray(ratios.detach().cpu() if isinstance(ratios, torch.Tensor) else ratios, dtype=float)
    r = r[np.isfinite(r) & (r > 0)]
    outside = float(((r < 1 - eps_low) | (r > 1 + eps_high)).mean()) if len(r) else math.nan
    fig = _new_figure("constrained")
    fig.set_size_inches(8, 3.6)
    ax = fig.subplots()
    lo, hi = (min(r.min(), 1 - eps_low), max(r.max(), 1 + eps_high)) if len(r) else (0.5, 2.0)
    edges = np.geomspace(lo * 0.95, hi * 1.05, bins + 1)
    ax.hist(r, bins=edges, color="C0")
    ax.axvspan(1 - eps_low, 1 + eps_high, color="C2", alpha=0.2, label=f"clip range [{1 - eps_low:g}, {1 + eps_high:g}]")
    ax.axvline(1.0, color="k", lw=1)
    ax.set_xscale("log")
    # Plain-number ticks: "10^0" alone says nothing about where the clip range is.
    ticks = [t for t in (1e-3, 1e-2, 0.1, 0.5, 1 - eps_low, 1.0, 1 + eps_high, 2.0, 10.0, 100.0, 1e3)
             if edges[0] <= t <= edges[-1]]
    ax.set_xticks(sorted(set(ticks)), [f"{t:g}" for t in sorted(set(ticks))])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(title=f"{title}\n{outside:.1%} outside the clip range, mean {r.mean():.3f}" if len(r) else title,
           xlabel="ratio (log scale)", ylabel="candidates")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig
