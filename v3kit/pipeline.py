"""The whole v3 pipeline in one call: data -> SFT (or a given v2 checkpoint) -> stage 1 -> RCE -> GRPO."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from . import stage_reuse, trackers
from .config import ConfigError, RunConfig, dump_config, load_config, to_dict
from .data.contract import GroupData, Splits
from .data.debias import DebiasReport, check_debias
from .moved import moved_names
from .provenance import NOT_EXPERIMENT_KEYS, config_changes, flatten
from .run import (  # noqa: F401 - re-exported: the pipeline's documented data and runtime helpers
    Run,
    grpo_temperature,
    last_stage,
    load_data,
    load_table,
    prepare_data,
    resolve_runtime,
    run_context,
    split_seed,
    stage_options,
    training_splits,
)
from .run_info import (  # noqa: F401 - re-exported: the pipeline's documented run-info helpers
    OWN_SFT,
    RUN_INFO,
    check_same_sft,
    read_run_info,
    record_config,
    record_sft_checkpoint,
    recorded_sft_checkpoint,
    recorded_split_seed,
    update_run_info,
)
from .rundir import RunLock, atomic_write_text
from .train import distributed
from .train.baselines import baseline_table
from .train.checkpoint import (
    check_finite_checkpoint,
    checkpoint_model_config,
    load_checkpoint,
)
from .train.device import Runtime
from .train.metrics import evaluate, metric_order
from .train.metrics_log import read_metrics_frame
from .train.model import compute_log_probs
from .train.model_size import check_model_fits
from .train.selection import Selection, write_selection
from .train.sft import Stage1
from .train.training import StageResult

# What a resumed run may change: GRPO is the last stage, so more GRPO epochs extend it without invalidating
# anything. Every other change (data, model, SFT, RCE, seed) would make the saved checkpoints belong to
# another experiment, and RCE's temperature schedule depends on its total number of steps.
# The keys that are not part of the experiment (provenance.NOT_EXPERIMENT_KEYS) may change too.
# What to do on a NaN/inf batch is a policy for the steps still to come, not part of what was trained.
RESUMABLE_CHANGES = (*NOT_EXPERIMENT_KEYS, "grpo.epochs", "sft.on_nonfinite", "rce.on_nonfinite", "grpo.on_nonfinite")


def check_resumable(cfg: RunConfig, run_dir: str | Path) -> None:
    """Refuse to resume ``run_dir`` under a config that differs from the one it was started with."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return
    try:
        old = to_dict(load_config(path))
    except ConfigError as e:
        raise ConfigError(f"cannot resume {run_dir}: its config.yaml is not valid for this v3kit ({e})") from None
    details = config_changes(flatten(old), flatten(to_dict(cfg)), RESUMABLE_CHANGES)
    if details:
        raise ConfigError(
            f"cannot resume {run_dir} under another config ({details}); only {list(RESUMABLE_CHANGES)} "
            "may change on --resume: use a new run_dir, or drop --resume to start over"
        )


def stage_table(
    models: dict[str, nn.Module],
    data: GroupData,
    reference: nn.Module,
    temperature: float,
    *,
    precision: str = "fp32",
    baselines: bool = False,
) -> pd.DataFrame:
    """One row per stage of held-out metrics, columns in :data:`METRIC_NAMES` order; ``baselines`` appends the
    trivial rankers of :mod:`v3kit.train.baselines` (random, raw cosine, reward oracle) for context.

    Every stage is scored at the same ``temperature`` (the model's ``sim_temperature``), so ``entropy`` and
    ``kl_to_sft`` compare like with like even when GRPO trained at another logit temperature; the per-epoch curves
    in ``metrics.csv`` use each stage's own temperature. Ranking metrics do not depend on it.
    """
    ref_logp = compute_log_probs(reference, data, temperature, precision=precision)  # once for every stage
    scored: dict[int, dict[str, float]] = {}  # one evaluation per model: 'selected' is often another row's model
    for m in models.values():
        if id(m) not in scored:
            scored[id(m)] = evaluate(
                m, data, temperature=temperature, reference=reference, ref_logp=ref_logp, precision=precision
            )
    rows = {name: dict(scored[id(m)]) for name, m in models.items()}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "stage"
    if baselines:
        table = pd.concat([table, baseline_table(data)])
    return table[metric_order(table.columns)]


@dataclass
class PipelineResult:
    run_dir: Path
    splits: Splits
    stage1: Stage1
    rce: StageResult
    grpo: StageResult
    table: pd.DataFrame  # rows sft / rce / grpo, held-out test metrics
    models: dict[str, nn.Module] = field(default_factory=dict)  # on runtime.device
    runtime: Runtime | None = None
    # batches left out for a NaN/inf loss or gradient, per stage run with on_nonfinite=skip_batch
    skipped_batches: dict[str, int] = field(default_factory=dict)
    selection: Selection | None = None  # which model the run ships (the table's ``selected`` row)
    debias: DebiasReport | None = None  # what reward.debias did to the training rewards


def skipped_batches(run_dir: str | Path) -> dict[str, int]:
    """Per stage, the batches ``on_nonfinite=skip_batch`` skipped (the ``skipped_nonfinite`` column's sum)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        return {}
    df = read_metrics_frame(path)
    if "skipped_nonfinite" not in df.columns:
        return {}
    df = df[df["skipped_nonfinite"].notna()]
    return {str(k): int(v) for k, v in df.groupby("stage", sort=False)["skipped_nonfinite"].sum().items()}


def run_pipeline(
    cfg: RunConfig,
    *,
    sft_checkpoint: str | Path | None = None,
    splits: Splits | None = None,
    callbacks: Sequence[Any] = (),
    resume: bool = False,
    tracking: Mapping[str, Any] | None = None,
) -> PipelineResult:
    """Run SFT (unless ``sft_checkpoint``) -> stage 1 -> RCE -> GRPO in ``cfg.run_dir``; return the stage table.

    ``cfg.device`` / ``cfg.precision`` / ``cfg.threads`` are resolved first (:func:`resolve_runtime`); the
    thread count is set with ``torch.set_num_threads`` for the rest of the process. Holds ``run_dir``'s writer
    lock throughout (a second concurrent run there is refused, naming this PID). ``cfg.report_to``'s trackers see
    every logged row and the stage table (``tracking``: their tags and default store, see
    :func:`v3kit.trackers.start`).
    """
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir {run_dir} is a file, not a directory; set run_dir to a directory path")
    sft_checkpoint = sft_checkpoint or cfg.sft.checkpoint
    if sft_checkpoint and not Path(sft_checkpoint).is_file():
        raise ConfigError(
            f"sft.checkpoint / --sft {sft_checkpoint} does not exist; give the path of a v2 SFT "
            "checkpoint (v3kit import-sft makes one from your own model)"
        )
    if sft_checkpoint:
        # The given checkpoint's model is what runs, whatever cfg.model says: record that one in config.yaml.
        ckpt = load_checkpoint(sft_checkpoint)
        check_finite_checkpoint(ckpt, sft_checkpoint)  # before anything is written: refuse NaN/inf weights
        cfg = dataclasses.replace(cfg, model=checkpoint_model_config(ckpt, sft_checkpoint))
    run_dir.mkdir(parents=True, exist_ok=True)
    # Under torchrun rank 0 is the run dir's one writer (the other ranks write nothing) and its one reporter.
    main = distributed.current().main
    with RunLock(run_dir) if main else contextlib.nullcontext():
        with trackers.reporting(cfg, run_dir, resume=resume, tracking=tracking, active=main) as reporter:
            result = _run_locked(
                cfg,
                run_dir,
                sft_checkpoint=sft_checkpoint,
                splits=splits,
                callbacks=[*callbacks, *reporter.callbacks()],
                resume=resume,
            )
            reporter.finish(result.table, run_dir)
            return result


def _run_locked(
    cfg: RunConfig,
    run_dir: Path,
    *,
    sft_checkpoint: str | Path | None,
    splits: Splits | None,
    callbacks: Sequence[Any],
    resume: bool,
) -> PipelineResult:
    recorded = None
    if resume:
        check_resumable(cfg, run_dir)
        recorded = check_same_sft(run_dir, sft_checkpoint)
    run = Run(cfg, splits=splits, callbacks=callbacks, resume=resume)  # data, splits, runtime: resolved once
    check_before_writing(run)
    run.use_threads()
    main = distributed.current().main
    if main:
        dump_config(cfg, run_dir / "config.yaml")
    sft_path = Path(sft_checkpoint) if sft_checkpoint else run.ensure_sft()
    if main:
        record_sft_checkpoint(run_dir, sft_path, given=bool(sft_checkpoint), recorded=recorded)
        record_config(run_dir, cfg)
    distributed.barrier()

    stage1 = run.stage1(sft_path)
    if run.debias is not None and main:
        update_run_info(run_dir, **run.debias.as_dict())
    rce = run.rce(stage1)
    after_rce = copy.deepcopy(stage1.policy)
    grpo = run.grpo(stage1)

    distributed.barrier()  # rank 0's metrics.csv is complete
    result = ship(run, stage1, rce, after_rce, grpo, write=main)
    distributed.barrier()
    return result


def ship(
    run: Run, stage1: Stage1, rce: StageResult, after_rce: nn.Module, grpo: StageResult, *, write: bool = True
) -> PipelineResult:
    """The end of every run, sequential (:func:`run_pipeline`) or stacked: which model ``run.cfg.select`` ships, the
    stage table on the test split and, with ``write`` (rank 0), ``summary.csv`` and the selection's file."""
    models = {"sft": stage1.reference, "rce": after_rce, "grpo": stage1.policy}
    selection, models["selected"] = run.select(models)
    table = stage_table(
        models, run.splits.test, stage1.reference, stage1.model_config.sim_temperature, precision=run.runtime.precision
    )
    if write:
        atomic_write_text(run.run_dir / "summary.csv", table.to_csv())
        write_selection(run.run_dir, selection)
    return PipelineResult(
        run_dir=run.run_dir,
        splits=run.splits,
        stage1=stage1,
        rce=rce,
        grpo=grpo,
        table=table,
        models=models,
        runtime=run.runtime,
        skipped_batches=skipped_batches(run.run_dir),
        selection=selection,
        debias=run.debias,
    )


def check_before_writing(run: Run) -> None:
    """What must fail in one line before anything is written: a missing device (resolving the runtime), a model too
    big for it, data that cannot support ``reward.debias``, a ``select_metric`` the data cannot measure."""
    cfg, splits = run.cfg, run.splits
    check_model_fits(cfg.model, splits.train.query_dim, splits.train.cand_dim, run.runtime.device)
    check_debias(cfg.reward, splits.train)  # before SFT: data that cannot support it fails in one line now
    if cfg.select_metric == "utility@1" and splits.val.utility is None:
        raise ConfigError(
            "select_metric=utility@1 needs a true utility, which this data does not have; use a label "
            "metric such as select_metric=acc@1"
        )


# Names the notebooks imported from here before they moved to v3kit.stage_reuse (see CHANGELOG.md).
MOVED_TO_STAGE_REUSE = ("STATE_FILE", "ensure_rce", "ensure_stage1", "read_state")


__getattr__ = moved_names(__name__, stage_reuse, MOVED_TO_STAGE_REUSE.__contains__)
