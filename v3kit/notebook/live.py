"""Live training plots for the notebooks: :class:`LivePlot`, a :class:`v3kit.train.training.Callback`.

In a Jupyter kernel it displays one figure per stage and updates it in place (an ``IPython.display`` handle),
redrawing at most once every ``every_steps`` steps *and* at most once every ``every_seconds`` seconds, and never
more often than keeps drawing under ``max_overhead`` of the wall time; so plotting never dominates training.
Headless (no kernel, or ``V3KIT_LIVE=0``) it draws nothing while training and one static figure at the end of the
stage. The figures themselves are drawn by :mod:`v3kit.notebook.plots`.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Collection, Mapping, Sequence

import pandas as pd
from matplotlib.figure import Figure

from .plots import DEFAULT_PANELS, SFT_PANELS, Panel, draw_panels, figure_png, in_kernel, live_default, new_figure


class Throttle:
    """Decides when a redraw is due: at least ``every_steps`` steps *and* ``every_seconds`` seconds since the last
    one, and at least ``cost * (1 / max_overhead - 1)`` seconds when the last redraw took ``cost`` seconds (so
    drawing takes at most ``max_overhead`` of the time even when a figure is slow to render)."""

    def __init__(
        self,
        every_steps: int = 10,
        every_seconds: float = 1.0,
        max_overhead: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
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


class LivePlot:
    """Training callback that plots a stage's per-step and per-epoch metrics while it trains.

    ``panels``: per-stage panels (a sequence, or a ``{stage: panels}`` mapping); default :data:`DEFAULT_PANELS`.
    ``baseline``: the held-out metrics drawn as dashed lines (``"epoch0"``: the stage's own first evaluation, i.e.
    the SFT model for RCE; or a mapping such as :func:`v3kit.train.sft.sft_baseline`'s output; or None).
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
        self.figure = new_figure()
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
        return (
            f"{self.stage.upper()}  step {step}/{self.total_steps}  epoch {epoch}/{self.epochs or '?'}  "
            f"({self.clock() - self._t0:.0f} s)"
        )

    def redraw(self, title: str | None = None) -> Figure:
        start = time.perf_counter()
        train, evals = self.frames()
        draw_panels(
            self.figure,
            self.panels(),
            train,
            evals,
            baseline=self.baseline(),
            steps_per_epoch=self.steps_per_epoch,
            title=self.title() if title is None else title,
            baseline_label=self.baseline_label or ("epoch 0 (untrained)" if self.stage == "sft" else "SFT baseline"),
        )
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
        self.figure = new_figure()
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


def plot_history(
    history: pd.DataFrame,
    stage: str,
    *,
    panels: Sequence[Panel] | None = None,
    baseline: Mapping[str, float] | str | None = "epoch0",
    title: str | None = None,
) -> Figure:
    """Static figure of one stage from ``metrics.csv`` rows (or ``StageResult.history``)."""
    plot = LivePlot(panels=panels, baseline=baseline, live=False, display=False)
    plot.load_history(history, stage)
    plot.redraw(title=title or f"{stage}: {len(plot.train_rows)} steps")
    return plot.figure
