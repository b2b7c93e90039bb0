"""What a grid worker runs: one world's SFT, one (world, variant, seed) run or a stack of runs, and the run's
``result.json`` (its grid rows, per-query test outcomes and run info).

These are the task functions the backends (:mod:`v3kit.ablate.backends`: local processes or Ray) call in a worker;
:mod:`v3kit.ablate.runner` plans the tasks, skips finished ones and collects the results.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import RunConfig, to_dict
from ..data.reward_stats import label_reward_agreement
from ..pipeline import prepare_data, run_pipeline, update_run_info
from ..pipeline_stacked import run_stacked, train_sft_stacked
from ..run import Run
from ..rundir import atomic_write_text
from ..train.metrics import per_group_metrics
from ..train.model import compute_log_probs
from .backends import worker_config
from .grid import METRIC_DIRECTION, PER_QUERY_METRICS, STEP0_INFO
from .tasks import RunTask, SFTStackTask, SFTTask, StackTask


def per_query_outcomes(
    model: Any, data: Any, temperature: float, reference: Any, ref_logp: Any = None
) -> dict[str, np.ndarray]:
    """Per test query: the :data:`PER_QUERY_METRICS` of ``model`` (their means are
    :func:`v3kit.train.metrics.ranking_metrics`'s values; ``ndcg@5`` is NaN for queries with all rewards equal).
    ``ref_logp``: ``reference``'s log-probs on ``data`` when the caller already has them."""

    logp = compute_log_probs(model, data, temperature)
    ref = compute_log_probs(reference, data, temperature) if ref_logp is None else ref_logp
    out = per_group_metrics(logp, data.labels, data.rewards, data.mask, utility=data.utility, logp=logp, ref_logp=ref)
    return {k: v.double().numpy() for k, v in out.items() if k in PER_QUERY_METRICS}


_SPLITS_CACHE: dict[str, Any] = {}


def splits_for(cfg: RunConfig) -> Any:
    """The world's splits (cached per process: every run of a world in this worker reuses them)."""
    key = json.dumps(
        {"data": to_dict(cfg)["data"], "seed": cfg.seed, "candidate_table": cfg.candidate_table},
        sort_keys=True,
        default=str,
    )
    if key not in _SPLITS_CACHE:
        _SPLITS_CACHE.clear()  # one world at a time is plenty; keeps memory flat
        _SPLITS_CACHE[key] = prepare_data(cfg)
    return _SPLITS_CACHE[key]


def train_sft(task: SFTTask) -> str:
    """Train the world's SFT checkpoint once (``sft.pt`` and its ``sft.hash``), which every run of the world loads."""
    run = Run(worker_config(task.cfg), splits=splits_for(task.cfg), warn=False)  # the worker's device, as its runs get
    run.sft(run_dir=task.path.parent, progress=False, callbacks=[], resume=False)
    _sft_done(task)
    return task.world


def _sft_done(task: SFTTask) -> None:
    for p in task.path.parent.glob("sft_epoch*.pt"):  # sft.pt is the checkpoint every run loads
        p.unlink()
    atomic_write_text(task.path.parent / "sft.hash", task.hash)  # last: the hash vouches for a complete sft.pt


def train_sft_stack(stack: SFTStackTask) -> str:
    """Train the SFT checkpoints of ``stack`` as one stacked model (:func:`v3kit.pipeline_stacked.train_sft_stacked`),
    each as :func:`train_sft` would; one that failed is reported, the others are kept."""
    cfgs = [dataclasses.replace(worker_config(t.cfg), run_dir=str(t.path.parent), progress=False) for t in stack.tasks]
    out = train_sft_stacked(cfgs, splits_for(stack.tasks[0].cfg))
    failed = []
    for task, res in zip(stack.tasks, out.results):
        if isinstance(res, BaseException):
            failed.append(f"{task.world}/sft {task.path.parent.name}: {type(res).__name__}: {res}")
        else:
            _sft_done(task)
    if failed:
        raise RuntimeError("\n".join(failed))
    return stack.world


def execute_run(task: RunTask) -> dict[str, Any]:
    """Run one (world, variant, seed) from the shared SFT checkpoint and write its ``result.json``."""

    t0 = time.perf_counter()
    splits = splits_for(task.split_cfg)
    cfg = worker_config(task.cfg)  # one thread in a worker, and its GPU; run_pipeline sets the threads
    res = run_pipeline(cfg, sft_checkpoint=task.sft_path, splits=splits, tracking=task.tracking)
    return _write_result(task, res, splits, time.perf_counter() - t0)


def execute_stack(stack: StackTask) -> dict[str, Any]:
    """Run the runs of ``stack`` as one stacked model (:func:`v3kit.pipeline_stacked.run_stacked`) and write each
    run's ``result.json``, as :func:`execute_run` would; a run that failed is reported, the others are kept."""
    t0 = time.perf_counter()
    first = stack.tasks[0]
    splits = splits_for(first.split_cfg)
    out = run_stacked(
        [worker_config(t.cfg) for t in stack.tasks],
        sft_checkpoint=[t.sft_path for t in stack.tasks],  # each run's own (one per seed for a variant's own SFT)
        splits=splits,
        tracking=[t.tracking for t in stack.tasks],
    )
    wall = (time.perf_counter() - t0) / len(stack.tasks)  # each run's share of the stack's wall time
    failed = []
    for task, res in zip(stack.tasks, out.results):
        if isinstance(res, BaseException):
            failed.append(f"{task.world}/{task.variant}/seed{task.seed}: {type(res).__name__}: {res}")
            continue
        _write_result(task, res, splits, wall, stacked=out.stacked, note="; ".join(out.notes))
    if failed:
        raise RuntimeError("\n".join(failed))
    return {"runs": len(stack.tasks), "stacked": out.stacked}


def _write_result(
    task: RunTask, res: Any, splits: Any, wall: float, *, stacked: bool = False, note: str = ""
) -> dict[str, Any]:
    """The run's ``result.json`` (its grid rows, per-query outcomes and run info) from its pipeline result."""
    run_dir = Path(task.cfg.run_dir)
    update_run_info(run_dir, split_seed=task.split_cfg.seed)  # the doctor rebuilds the split the run trained on
    keys = {"world": task.world, "variant": task.variant, "seed": task.seed}
    info = {k: float(res.grpo.info[k]) for k in STEP0_INFO if k in res.grpo.info}
    # How often the reward's top candidate is the label on the test split: what the conclusions read label metrics
    # against, above all on real data without a true utility.
    info["reward_label_agreement"] = label_reward_agreement(splits.test)
    if res.debias is not None:
        info.update({k: v for k, v in res.debias.as_dict().items() if isinstance(v, float)})
    if res.selection is not None:
        info["selected_stage"] = res.selection.stage
        info["selected_epoch"] = float(res.selection.epoch)
    info["stacked"] = bool(stacked)  # a grid row says whether its run trained in a stack
    if note:
        info["stack_note"] = note
    rows = []
    for stage, hist in (("rce", res.rce.eval_history), ("grpo", res.grpo.eval_history)):
        for rec in hist.to_dict("records"):
            row = {**keys, "split": "val", "stage": stage, "epoch": int(rec["epoch"])}
            row.update({m: rec[m] for m in METRIC_DIRECTION if m in rec and pd.notna(rec[m])})
            rows.append(row)
    epochs = {
        "sft": task.cfg.sft.epochs,
        "rce": task.cfg.rce.epochs,
        "grpo": task.cfg.grpo.epochs,
        "selected": res.selection.epoch if res.selection is not None else task.cfg.grpo.epochs,
    }
    for stage, rec in res.table.iterrows():
        rows.append(
            {**keys, "split": "test", "stage": stage, "epoch": epochs[stage], **{k: float(v) for k, v in rec.items()}}
        )
    temperature = res.stage1.model_config.sim_temperature  # as pipeline.stage_table evaluates
    test = splits.test

    ref_logp = compute_log_probs(res.models["sft"], test, temperature)  # once for every model
    outcomes: dict[int, dict[str, list[float]]] = {}  # once per model: 'selected' is often 'grpo' or 'sft'
    pq = {}
    for name in ("sft", "grpo", "selected"):
        model = res.models.get(name)
        if model is None:
            continue
        if id(model) not in outcomes:
            got = per_query_outcomes(model, test, temperature, res.models["sft"], ref_logp=ref_logp)
            outcomes[id(model)] = {k: v.tolist() for k, v in got.items()}
        pq[name] = outcomes[id(model)]
    payload = {
        "hash": task.hash,
        **keys,
        "run_dir": str(run_dir),
        "wall_s": wall,
        "info": info,
        "rows": rows,
        "per_query": pq,
        "query_ids": list(test.query_ids),
    }
    if not task.keep_checkpoints:  # ~5 MB of per-epoch checkpoints per run; metrics.csv is what the doctor reads
        for p in run_dir.glob("*_epoch*.pt"):
            p.unlink()
    atomic_write_text(task.result_path, json.dumps(payload))
    return {**keys, "wall_s": wall}
