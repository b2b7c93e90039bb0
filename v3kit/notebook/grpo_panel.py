"""The GRPO comparison panel of notebook 03: widgets for GRPO's knobs, a Run button, overlaid curves, a table.

Every run starts from the same post-RCE policy (a deep copy per run), the same stage-1 ``old_log_probs`` and
frozen SFT reference, and the same seed, so two runs differ only in the settings the panel shows. Only GRPO
trains; SFT and RCE are done once before the panel is made.

The logic is plain Python: :meth:`ComparePanel.run` (or the button's click handler) reads the widget values, and
:meth:`ComparePanel.run_grid` runs a parameter list the same way, which is what papermill does with nobody to click.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn

from ..config import RunConfig
from ..data.contract import Splits
from ..run import Run, grpo_temperature
from ..train.grpo import KL_REFERENCES, OLD_POLICIES, GRPOConfig
from ..train.metrics import METRIC_NAMES
from ..train.sft import Stage1, sft_baseline
from ..train.training import split_rows
from .live import Throttle
from .plots import figure_png, live_default, smooth

SETTINGS = ("kl_beta", "eps_low", "eps_high", "lr", "epochs", "old_policy", "kl_reference")
KL_BETAS = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.5, 1.0)  # log-spaced, plus 0 (no KL penalty)
LRS = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
TRAIN_CURVES = ("loss", "kl", "clip_ratio")
TABLE_METRICS = tuple(m for m in METRIC_NAMES if m not in ("ndcg@5", "regret@1"))  # the panel's narrow table


@dataclass
class GRPOStart:
    """What every comparison run starts from: the notebook's :class:`~v3kit.run.Run` (its training splits, GRPO
    settings, seed, device and threads), stage 1 and the post-RCE policy."""

    run: Run
    stage1: Stage1
    model: nn.Module  # the post-RCE policy (kept untouched; each run trains a deep copy)
    sft_metrics: dict[str, float] = field(default_factory=dict)  # held-out (val) metrics of the SFT model

    @classmethod
    def from_run(cls, run: Run, stage1: Stage1, rce_model: nn.Module) -> "GRPOStart":
        run.use_threads()  # the config's threads, as `v3kit run` sets them
        return cls(
            run=run, stage1=stage1, model=copy.deepcopy(rce_model), sft_metrics=sft_baseline(stage1, run.splits.val)
        )

    @classmethod
    def from_stages(cls, cfg: RunConfig, splits: Splits, stage1: Stage1, rce_model: nn.Module) -> "GRPOStart":
        return cls.from_run(Run(cfg, splits=splits), stage1, rce_model)

    @property
    def splits(self) -> Splits:
        return self.run.training_splits  # the rewards GRPO trains on (reward.debias); val as it is

    @property
    def base(self) -> GRPOConfig:
        return self.run.cfg.grpo  # settings the widgets do not show come from here

    @property
    def temperature(self) -> float:
        return grpo_temperature(self.run.cfg, self.stage1.model_config)  # GRPO's logit temperature


@dataclass
class CompareRun:
    index: int
    settings: dict[str, Any]
    history: pd.DataFrame
    final: dict[str, float]
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def train(self) -> pd.DataFrame:
        return split_rows(self.history, "train")

    @property
    def evals(self) -> pd.DataFrame:
        return split_rows(self.history, "val")


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_labels(settings: Sequence[Mapping[str, Any]]) -> list[str]:
    """Legend labels naming what differs between runs (``kl_beta`` when nothing does), numbered ``#1``, ``#2``..."""
    varying = [k for k in SETTINGS if len({_fmt(s.get(k)) for s in settings}) > 1] or ["kl_beta"]
    return [f"#{i + 1} " + ", ".join(f"{k}={_fmt(s.get(k))}" for k in varying) for i, s in enumerate(settings)]


def _options(values: Iterable[float]) -> list[tuple[str, float]]:
    return [(_fmt(float(v)), float(v)) for v in sorted(set(float(v) for v in values))]


class ComparePanel:
    """Widgets + overlay figure + table for GRPO runs from one :class:`GRPOStart`.

    ``save_dir``: if given, each run writes its ``metrics.csv`` and checkpoints to ``save_dir/run{i}`` (default:
    nothing on disk; the notebook's own GRPO run owns ``grpo_epoch*.pt`` in the run directory).
    """

    def __init__(
        self,
        start: GRPOStart,
        *,
        save_dir: str | Path | None = None,
        live: bool | None = None,
        every_seconds: float = 1.0,
        dpi: int = 80,
    ) -> None:
        import ipywidgets as w

        self.start = start
        self.save_dir = None if save_dir is None else Path(save_dir)
        self.live = live_default() if live is None else live
        self.every_seconds = every_seconds
        self.dpi = dpi
        self.runs: list[CompareRun] = []
        self._partial: list[dict[str, Any]] | None = None  # rows of the run in progress (live overlay)
        self.figure = Figure()
        b = start.base
        style = {"description_width": "90px"}
        wide = w.Layout(width="380px")
        self.kl_beta = w.SelectionSlider(
            options=_options(KL_BETAS + (b.kl_beta,)),
            value=float(b.kl_beta),
            description="kl_beta",
            style=style,
            layout=wide,
        )
        self.lr = w.SelectionSlider(
            options=_options(LRS + (b.lr,)), value=float(b.lr), description="lr", style=style, layout=wide
        )
        self.eps_low = w.FloatSlider(
            value=b.eps_low, min=0.0, max=1.0, step=0.01, description="eps_low", style=style, layout=wide
        )
        self.eps_high = w.FloatSlider(
            value=b.eps_low if b.eps_high is None else b.eps_high,
            min=0.0,
            max=1.0,
            step=0.01,
            description="eps_high",
            style=style,
            layout=wide,
        )
        self.epochs = w.IntSlider(
            value=b.epochs, min=1, max=max(30, b.epochs), description="epochs", style=style, layout=wide
        )
        self.old_policy = w.Dropdown(
            options=list(OLD_POLICIES), value=b.old_policy, description="old policy", style=style, layout=wide
        )
        self.kl_reference = w.ToggleButtons(
            options=list(KL_REFERENCES), value=b.kl_reference, description="KL against", style=style
        )
        self.button = w.Button(description="Run GRPO", button_style="primary", icon="play")
        self.button.on_click(self._on_click)
        self.status = w.HTML("set the knobs and press Run; every run starts from the same post-RCE policy")
        # Both scale to the notebook's width: a wide results table scrolls instead of overflowing the page.
        self.image = w.Image(format="png", layout=w.Layout(max_width="100%", height="auto"))
        self.table_html = w.HTML(layout=w.Layout(width="100%", overflow="auto"))
        self.widget = w.VBox(
            [
                w.HBox([self.kl_beta, self.lr]),
                w.HBox([self.eps_low, self.eps_high]),
                w.HBox([self.epochs, self.old_policy]),
                self.kl_reference,
                w.HBox([self.button, self.status]),
                self.image,
                self.table_html,
            ]
        )
        self.redraw()

    # ---- settings
    def settings(self) -> dict[str, Any]:
        return {
            "kl_beta": float(self.kl_beta.value),
            "eps_low": float(self.eps_low.value),
            "eps_high": float(self.eps_high.value),
            "lr": float(self.lr.value),
            "epochs": int(self.epochs.value),
            "old_policy": self.old_policy.value,
            "kl_reference": self.kl_reference.value,
        }

    def set(self, **values: Any) -> None:
        """Set widgets from Python (``panel.set(kl_beta=0.01)``); a value missing from a log slider is added."""
        for name, value in values.items():
            if name not in SETTINGS:
                raise ValueError(f"unknown setting {name!r}; the panel has {SETTINGS}")
            widget = getattr(self, name)
            if name in ("kl_beta", "lr"):
                value = float(value)
                if value not in [v for _, v in widget.options]:
                    widget.options = _options([v for _, v in widget.options] + [value])
            widget.value = value

    # ---- running
    def config(self, settings: Mapping[str, Any]) -> GRPOConfig:
        # dataclasses.replace re-runs GRPOConfig's validation, so a bad combination fails with its message.
        return dataclasses.replace(self.start.base, **{k: settings[k] for k in SETTINGS})

    def run(self, **overrides: Any) -> CompareRun:
        """Run GRPO with the widgets' settings (after applying ``overrides`` to the widgets); add it to the plot."""
        self.set(**overrides)
        settings = self.settings()
        self.config(settings)  # a bad combination fails here, with GRPOConfig's message, before the status changes
        index = len(self.runs) + 1
        self.status.value = f"running #{index}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in settings.items())
        s = self.start
        run_dir = None if self.save_dir is None else self.save_dir / f"run{index}"
        self._partial = []
        t0 = time.perf_counter()
        try:
            result = s.run.grpo(
                s.stage1,
                policy=copy.deepcopy(s.model),
                context={"run_dir": run_dir, "callbacks": [_Overlay(self)], "progress": False, "resume": False},
                **{k: settings[k] for k in SETTINGS},
            )
        finally:
            self._partial = None
        seconds = time.perf_counter() - t0
        info = {k: v for k, v in result.info.items() if k.startswith("step0_") and k != "step0_ratios"}
        record = CompareRun(
            index=index,
            settings=settings,
            history=result.history,
            final=result.final_metrics,
            seconds=seconds,
            info=info,
        )
        self.runs.append(record)
        self.redraw()
        self.status.value = f"#{index} done in {seconds:.1f} s"
        return record

    def run_grid(self, **grid: Sequence[Any]) -> list[CompareRun]:
        """One run per value of a single setting, e.g. ``run_grid(kl_beta=[0.0, 0.01, 0.1, 0.5])``."""
        if len(grid) != 1:
            raise ValueError("run_grid takes exactly one setting with a list of values, e.g. kl_beta=[0, 0.1]")
        ((name, values),) = grid.items()
        return [self.run(**{name: v}) for v in values]

    def _on_click(self, _button: Any = None) -> None:
        self.button.disabled = True
        try:
            self.run()
        except Exception as e:  # keep the panel usable; show the reason where the user is looking
            self.status.value = f"<b style='color:#b00'>failed: {type(e).__name__}: {e}</b>"
            raise
        finally:
            self.button.disabled = False

    # ---- output
    @property
    def table(self) -> pd.DataFrame:
        """One row per run: its settings, final held-out metrics, step-0 ratio clip share and wall time."""
        rows = []
        for r in self.runs:
            row = {"run": f"#{r.index}", **r.settings}
            row.update({m: r.final.get(m) for m in TABLE_METRICS if m in r.final})
            row["step0_outside_clip"] = r.info.get("step0_outside_clip")
            row["seconds"] = round(r.seconds, 1)
            rows.append(row)
        return pd.DataFrame(rows).set_index("run") if rows else pd.DataFrame(columns=["run", *SETTINGS])

    def _eval_metrics(self) -> tuple[str, ...]:
        have_utility = self.start.splits.val.utility is not None
        return ("acc@1", "reward@1", "utility@1" if have_utility else "kl_to_sft")

    def redraw(self) -> Figure:
        """Redraw the overlay: per-step training curves and per-epoch held-out metrics, one colour per run."""
        fig = self.figure
        fig.clear()
        fig.set_size_inches(13, 6.5)
        # Fixed margins, no layout engine: it would double the cost of every (live) redraw.
        axes = fig.subplots(
            2,
            3,
            squeeze=False,
            gridspec_kw={"left": 0.06, "right": 0.99, "bottom": 0.08, "top": 0.9, "wspace": 0.25, "hspace": 0.35},
        )
        labels = run_labels([r.settings for r in self.runs] + ([self.settings()] if self._partial else []))
        series = [(r.train, r.evals) for r in self.runs]
        if self._partial:
            part = pd.DataFrame(self._partial)
            series.append((part[part["split"] == "train"], part[part["split"] == "val"]))
        for ax, key in zip(axes[0], TRAIN_CURVES):
            ax.set(title=f"train {key} (moving avg)", xlabel="step", ylabel=key)
            for i, (train, _) in enumerate(series):
                if key in train.columns and len(train):
                    ax.plot(train["step"], smooth(train[key].to_numpy(float)), color=f"C{i % 10}", label=labels[i])
        for ax, key in zip(axes[1], self._eval_metrics()):
            ax.set(title=f"held-out {key}", xlabel="epoch", ylabel=key)
            for i, (_, evals) in enumerate(series):
                if key in evals.columns and len(evals):
                    ax.plot(evals["epoch"], evals[key], "o-", color=f"C{i % 10}", label=labels[i])
            if key in self.start.sft_metrics:
                ax.axhline(self.start.sft_metrics[key], color="k", ls="--", lw=1, label="SFT")
        for ax in axes.ravel():
            ax.grid(alpha=0.3)
        for ax in axes[1]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if series:
            axes[0][0].legend(fontsize=8, loc="best")
            axes[1][0].legend(fontsize=8, loc="best")
        fig.suptitle(f"GRPO runs from the same post-RCE policy ({len(self.runs)} done)", fontsize=11)
        self.image.value = figure_png(fig, self.dpi)
        table = self.table
        self.table_html.value = table.to_html(float_format=lambda x: f"{x:.4f}") if len(table) else ""
        return fig


class _Overlay:
    """Callback that redraws the panel during a run, throttled like :class:`v3kit.notebook.live.LivePlot`."""

    def __init__(self, panel: ComparePanel) -> None:
        self.panel = panel
        self.throttle = Throttle(every_steps=10, every_seconds=panel.every_seconds)

    def _add(self, row: dict[str, Any]) -> None:
        if self.panel._partial is None:
            return
        self.panel._partial.append(dict(row))
        if self.panel.live and self.throttle.ready(int(row["step"])):
            start = time.monotonic()
            self.panel.redraw()
            self.throttle.mark(int(row["step"]), time.monotonic() - start)

    on_step = _add
    on_eval = _add
