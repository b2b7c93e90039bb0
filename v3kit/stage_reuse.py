"""Stage reuse for the notebooks: each notebook can run alone, and in order they share one run directory.

``ensure_stage1`` / ``ensure_rce`` reuse ``sft.pt`` / ``rce_epoch{N}.pt`` when an earlier notebook made them from
the same data and settings (recorded in ``notebook_state.json``), and otherwise (re)make them, removing the later
stages' outputs derived from the old ones. They train through the notebook's :class:`v3kit.run.Run`, as ``v3kit run``
does (one resolution of the data, the splits and the runtime per notebook).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

from .config import RunConfig
from .data.contract import Splits
from .provenance import signature
from .run import Run
from .rundir import atomic_write_text
from .train.metrics_log import read_metrics_frame
from .train.sft import Stage1
from .train.training import StageResult

STATE_FILE = "notebook_state.json"


def read_state(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _write_state(run_dir: Path, state: dict[str, Any]) -> None:
    atomic_write_text(run_dir / STATE_FILE, json.dumps(state, indent=1, sort_keys=True))


def _invalidate(run_dir: Path, stages: Sequence[str], state: dict[str, Any]) -> None:
    """Remove outputs of ``stages`` (derived from an earlier stage that is being remade) and their log rows."""
    removed = [p for s in stages for p in sorted(run_dir.glob(f"{s}_epoch*.pt"))]
    for p in removed:
        p.unlink()
    metrics = run_dir / "metrics.csv"
    if metrics.exists():
        df = read_metrics_frame(metrics)
        if df["stage"].isin(stages).any():
            atomic_write_text(metrics, df[~df["stage"].isin(stages)].to_csv(index=False))
    for s in stages:
        state.pop(s, None)
    if removed:
        print(f"removed {len(removed)} stale checkpoint(s) of {', '.join(stages)} made from the previous inputs")


def as_run(run: Run | RunConfig, splits: Splits | None = None) -> Run:
    """``run`` itself, or a :class:`Run` of a config (and its prepared ``splits``), as the notebooks once passed."""
    return run if isinstance(run, Run) else Run(run, splits=splits)


def ensure_stage1(
    run: Run | RunConfig,
    splits: Splits | None = None,
    *,
    sft_checkpoint: str | Path | None = None,
    callbacks: Sequence[Any] = (),
) -> Stage1:
    """Stage 1 on ``run_dir/sft.pt``: copy ``sft_checkpoint`` there if given, else reuse the one an earlier
    notebook made with the same data and SFT settings, else train SFT (``callbacks`` see that training)."""
    run = as_run(run, splits)
    cfg, run_dir = run.cfg, run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    run.use_threads()  # device / precision / threads as in `v3kit run`
    state = read_state(run_dir)
    sft_path = run_dir / "sft.pt"
    data_sig = signature(cfg, "data")
    sft_sig = signature(cfg, "model", "sft")
    prev = state.get("stage1")
    if sft_checkpoint is not None:
        src = Path(sft_checkpoint).resolve()
        want = {"data": data_sig, "sft": {"external": str(src)}}
        if src != sft_path.resolve():
            shutil.copyfile(src, sft_path)
        print(f"using the given SFT checkpoint {src} (copied to {sft_path})")
        origin = "given"
    elif (
        sft_path.exists()
        and prev is not None
        and prev.get("data") == data_sig
        and (prev.get("sft") == sft_sig or "external" in prev.get("sft", {}))
    ):
        want = prev
        print(f"reusing {sft_path} (same data and SFT settings as the notebook that made it)")
        origin = "reused"
    else:
        want = {"data": data_sig, "sft": sft_sig}
        why = "none in the run dir yet" if not sft_path.exists() else "data or SFT settings changed"
        print(f"training SFT ({why}) -> {sft_path}")
        origin = "trained"
        _invalidate(run_dir, ("rce", "grpo"), state)
        run.sft(callbacks=callbacks, resume=False)
    if prev != want:
        _invalidate(run_dir, ("rce", "grpo"), state)
    state["stage1"] = want
    _write_state(run_dir, state)
    stage1 = run.stage1(sft_path)
    stage1.origin = origin
    return stage1


def ensure_rce(
    run: Run | RunConfig,
    splits: Splits | None = None,
    stage1: Stage1 | None = None,
    *,
    callbacks: Sequence[Any] = (),
    fresh: bool = False,
) -> StageResult:
    """Stage 2 on ``stage1.policy`` (in place): reuse ``rce_epoch{epochs}.pt`` made from the same stage 1 with the
    same RCE settings (unless ``fresh``), else train RCE. ``result.model`` is the post-RCE policy. Called as
    ``ensure_rce(run, stage1=stage1)`` (or, as before, ``ensure_rce(cfg, splits, stage1)``)."""
    if stage1 is None:
        raise TypeError("ensure_rce needs stage1 (ensure_stage1's result)")
    run = as_run(run, splits)
    cfg, run_dir = run.cfg, run.run_dir
    state = read_state(run_dir)
    want = {"stage1": state.get("stage1"), "rce": signature(cfg, "rce", "reward")}
    last = run_dir / f"rce_epoch{cfg.rce.epochs}.pt"
    reuse = not fresh and state.get("rce") == want and (cfg.rce.epochs == 0 or last.exists())
    if reuse:
        print(f"reusing {last.name} (same SFT and RCE settings as the notebook that made it)")
    else:
        print(f"training RCE for {cfg.rce.epochs} epoch(s) -> {run_dir}/rce_epoch*.pt")
        _invalidate(run_dir, ("rce", "grpo"), state)
    run.use_threads()
    result = run.rce(stage1, callbacks=callbacks, resume=reuse)  # on the de-biased training splits, as `v3kit run`
    state["rce"] = want
    _write_state(run_dir, state)
    result.info["origin"] = "reused" if reuse else "trained"
    return result
