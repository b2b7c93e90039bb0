"""Which model a run ships (``select``): the last stage's, or the checkpoint with the best val metric.

The candidates are the SFT model and every RCE and GRPO epoch checkpoint of the run, judged by their val rows in
``metrics.csv`` (``select_metric``; ranking metrics do not depend on the logit temperature). ``best_val`` keeps the
best one (the earliest on a tie, so an RL epoch must *beat* SFT to be kept); ``last`` keeps the end of the last
stage that ran. Each stage's start counts as a candidate: RCE's is SFT, GRPO's is RCE's end, and under ``best_val``
an SFT the kit trains keeps its best val epoch *including epoch 0*, its initial model (:class:`BestVal`), so a stage
that only hurts val ships the model it started from, bit for bit (for a residual model that is the raw cosine). Either way the run records the choice in ``selected.json`` and says so when the shipped model is
below SFT on val: a pipeline never ships a regression silently.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from .metrics import METRIC_DIRECTION

SELECTED_FILE = "selected.json"


@dataclass
class Selection:
    stage: str  # sft | rce | grpo
    epoch: int  # the stage's epoch (the SFT model: its last epoch, or 0 for a given checkpoint)
    metric: str
    val: float  # the selected model's val metric
    sft_val: float  # SFT's val metric
    mode: str  # last | best_val
    checkpoint: str | None = None  # the checkpoint file it was read from (None: the model in memory)

    @property
    def below_sft(self) -> bool:
        return METRIC_DIRECTION[self.metric] * (self.val - self.sft_val) < 0

    def line(self) -> str:
        where = "SFT" if self.stage == "sft" else f"{self.stage} epoch {self.epoch}"
        text = (
            f"selected ({'best val' if self.mode == 'best_val' else 'last stage'} {self.metric}): {where}, val "
            f"{self.metric} {self.val:.4f} (SFT {self.sft_val:.4f})"
        )
        if self.below_sft:
            text += (
                " -- BELOW SFT on val: this run ships a model worse than the one it started from; use "
                "select=best_val or keep SFT (v3kit investigate RUN_DIR tests what to ship instead)"
            )
        return text

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "below_sft": self.below_sft}


def best_epoch(rows: pd.DataFrame, metric: str) -> tuple[int, float] | None:
    """(epoch, value) of the best val ``metric`` among ``rows`` (one stage's val rows, epoch 0 = its start), the
    earliest on a tie; None without rows."""
    rows = rows.dropna(subset=[metric]) if metric in rows.columns else rows[:0]
    if not len(rows):
        return None
    d = METRIC_DIRECTION[metric]
    best: tuple[int, float] | None = None
    for e, v in zip(rows["epoch"], rows[metric]):
        if best is None or d * (float(v) - best[1]) > 0:
            best = (int(e), float(v))
    return best


def val_scores(metrics: pd.DataFrame, metric: str, best_sft: bool = False) -> list[tuple[str, int, float]]:
    """(stage, epoch, val ``metric``) of the SFT model and of every RCE and GRPO epoch, in training order; SFT is
    the last SFT val row (``best_sft``: its best one, the SFT a ``best_val`` run keeps), else RCE's (or GRPO's)
    epoch-0 row (a given checkpoint has no SFT rows)."""
    val = metrics[metrics["split"] == "val"].dropna(subset=[metric]) if metric in metrics.columns else metrics[:0]
    out: list[tuple[str, int, float]] = []
    sft = val[val["stage"] == "sft"]
    if len(sft) and best_sft:
        e, v = best_epoch(sft, metric)  # type: ignore[misc]
        out.append(("sft", e, v))
    elif len(sft):
        out.append(("sft", int(sft["epoch"].iloc[-1]), float(sft[metric].iloc[-1])))
    for stage in ("rce", "grpo"):
        rows = val[val["stage"] == stage].groupby("epoch")[metric].last().sort_index()
        if not out and 0 in rows.index:
            out.append(("sft", 0, float(rows.loc[0])))
        out += [(stage, int(e), float(v)) for e, v in rows.items() if e > 0]
    return out


def choose(scores: list[tuple[str, int, float]], metric: str, mode: str, last_stage: str) -> tuple[str, int, float]:
    """The (stage, epoch, value) ``mode`` keeps: the best by ``metric``'s direction (earliest on ties), or the last
    entry of ``last_stage`` (the SFT entry when no later stage ran)."""
    if not scores:
        raise ValueError(f"no val {metric} rows to select from: the run logged no val metrics")
    if mode == "best_val":
        d = METRIC_DIRECTION[metric]
        best = scores[0]
        for s in scores[1:]:
            if d * (s[2] - best[2]) > 0:  # strictly better: ties keep the earlier (simpler) model
                best = s
        return best
    mine = [s for s in scores if s[0] == last_stage]
    return mine[-1] if mine else scores[0]


def select_model(
    run_dir: Path,
    metrics: pd.DataFrame,
    metric: str,
    mode: str,
    last_stage: str,
    sft_val: Callable[[], float] | None = None,
) -> Selection:
    """The :class:`Selection` of a finished run from its val rows. ``sft_val`` computes SFT's val metric when no row
    holds it (a given checkpoint with RCE and GRPO off)."""
    scores = val_scores(metrics, metric, best_sft=mode == "best_val")
    if not scores or scores[0][0] != "sft":
        if sft_val is None:
            raise ValueError(f"no val {metric} of the SFT model in metrics.csv")
        scores.insert(0, ("sft", 0, float(sft_val())))
    stage, epoch, value = choose(scores, metric, mode, last_stage)
    path = None
    if stage != "sft":
        path = str(Path(run_dir) / f"{stage}_epoch{epoch}.pt")
    return Selection(stage, epoch, metric, value, scores[0][2], mode, path)


class BestVal:
    """A training callback that keeps the weights of a stage's best val epoch (epoch 0, the stage's start,
    included; the earliest on a tie) in memory: :func:`v3kit.train.sft.train_sft` ships them under
    ``select: best_val``."""

    def __init__(self, model: torch.nn.Module, stage: str, metric: str) -> None:
        self.model, self.stage, self.metric = model, stage, metric
        self.epoch: int | None = None
        self.value = math.nan
        self.state: dict[str, torch.Tensor] | None = None

    def on_eval(self, row: dict[str, Any]) -> None:
        v = row.get(self.metric)
        if row.get("stage") != self.stage or v is None or not math.isfinite(float(v)):
            return
        if self.epoch is None or METRIC_DIRECTION[self.metric] * (float(v) - self.value) > 0:
            self.epoch, self.value = int(row["epoch"]), float(v)
            self.state = {k: t.detach().clone() for k, t in self.model.state_dict().items()}


def write_selection(run_dir: Path, selection: Selection) -> None:
    from ..rundir import atomic_write_text

    atomic_write_text(Path(run_dir) / SELECTED_FILE, json.dumps(selection.as_dict(), indent=1) + "\n")


def read_selection(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / SELECTED_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None
