"""The loop every stage shares: epochs of mini-batches, held-out evaluation before the first step and after each
epoch, callbacks, ``metrics.csv``, atomic per-epoch checkpoints, and resume.

A stage is a :class:`Stage` subclass that implements ``step(batch, ctx) -> (loss, stats)``; the algorithm lives in
its stage module (``sft.py``, ``rce.py``, ``grpo.py``), the plumbing here. :class:`OptimConfig` holds the knobs
every stage has, :class:`RunContext` where and how a run trains.
"""

from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.contract import Batch, GroupData, iterate_batches, num_batches
from ..provenance import config_changes
from . import distributed
from .checkpoint import (
    CheckpointError,
    epoch_checkpoints,
    load_checkpoint,
    load_state_into,
    require_fields,
    save_checkpoint,
)
from .device import as_floats, autocast
from .metrics import evaluate
from .metrics_log import (  # noqa: F401 - Callback, StageResult, split_rows: documented here (v3kit.train.training)
    Callback,
    MetricsLog,
    StageResult,
    call_callbacks,
    split_rows,
    stage_log,
)
from .model import compute_log_probs
from .optim import (  # noqa: F401 - MAX_*, ON_NONFINITE, the checks: their old path (v3kit.train.training)
    MAX_BATCH_SIZE,
    MAX_EPOCHS,
    ON_NONFINITE,
    NonFiniteError,
    OptimConfig,
    check_on_nonfinite,
    check_optim_fields,
    grad_norm_clipped,
    nonfinite_error,
    nonfinite_step,
    weights_finite,
)
from .sliced import SlicedGrad


@dataclass
class StepContext:
    """What ``step_fn`` may need besides the batch."""

    epoch: int  # 1-based epoch in progress
    step: int  # 0-based global step of this stage (number of optimizer steps done before this one)
    total_steps: int
    generator: torch.Generator  # seeded; use it for any sampling so runs are reproducible and resumable


# ``stats`` values may be floats or 0-d tensors; tensors are read back to the host in batches (see ``log_every``).


def kill_point(name: str) -> None:
    """Crash tests only: ``V3KIT_TEST_KILL_AT=<name>`` SIGKILLs the process here (e.g. ``grpo:epoch2:step7``,
    ``rce:epoch1:before_checkpoint``, ``grpo:epoch2:after_checkpoint``), a deterministic stand-in for a crash."""
    if os.environ.get("V3KIT_TEST_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def check_same_config(ckpt: dict[str, Any], meta: dict[str, Any] | None, path: Path, extendable: Sequence[str]) -> None:
    """Resuming under another config would silently mix two experiments; only ``extendable`` keys may change."""
    if not meta or "config" not in meta:
        return
    details = config_changes(ckpt.get("config", {}), meta["config"], extendable)
    if details:
        raise CheckpointError(
            f"cannot resume from {path}: it was trained with another config ({details}); "
            "use a fresh run_dir or run without resume"
        )


@dataclass
class RunContext:
    """Where and how the stages of a run train: the same for every stage, so the runners pass one of these."""

    seed: int = 0  # seeds the batch order, any sampling, and torch's global RNG at the stage's start
    run_dir: str | Path | None = None  # None: nothing is written (metrics stay in memory)
    resume: bool = False  # continue from the stage's newest epoch checkpoint in run_dir
    callbacks: Sequence[Any] = ()  # Callback objects (live plots) that see every logged row
    progress: bool = True  # tqdm progress bar
    device: torch.device | str = "cpu"  # where the model, the reference and the batches live
    precision: str = "fp32"  # "bf16": CUDA autocast of the forward passes
    log_every: int = 10  # steps between host reads of the per-step statistics
    # the run's metrics log, handed from stage to stage (v3kit.run.Run passes its own): a stage then takes the rows
    # of the earlier ones from memory instead of reading metrics.csv again (None: each stage reads the file)
    metrics_log: MetricsLog | None = None


class Stage:
    """One training algorithm on the shared loop of :func:`fit`. A subclass sets :attr:`name`, passes its model,
    data and :class:`OptimConfig` to ``__init__``, and implements :meth:`step`; the other methods are optional
    hooks (their defaults do nothing). The algorithm then reads top to bottom in one class, as in CleanRL."""

    name = "stage"
    extendable: tuple[str, ...] = ("epochs",)  # config keys a resume may change (train a finished stage further)

    def __init__(
        self,
        model: nn.Module,
        train: GroupData,
        val: GroupData,
        cfg: OptimConfig,
        *,
        reference: nn.Module | None = None,
        temperature: float = 1.0,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.model, self.train, self.val, self.cfg = model, train, val, cfg
        self.reference = reference  # frozen SFT copy: kl_to_sft in every evaluation
        self.temperature = temperature  # logit temperature of the evaluations
        self.meta = meta or {}  # stored in every epoch checkpoint (config, model config, feature dims)

    def step(self, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Any]]:
        """The loss of one batch and its statistics (floats or 0-d tensors, read back in batches)."""
        raise NotImplementedError

    def eval_temperature(self) -> float:
        """The logit temperature the held-out evaluation reads the policy at."""
        return self.temperature

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each epoch's first step (1-based ``epoch``)."""

    def extra_state(self) -> dict[str, Any]:
        """Stage state beyond the model and optimizer that a checkpoint must hold for a bit-identical resume."""
        return {}

    def restore_extra(self, extra: dict[str, Any]) -> None:
        """Load what :meth:`extra_state` saved."""

    def eval_extra(self, epoch: int) -> dict[str, float]:
        """Values added to the held-out evaluation row of ``epoch`` (0 = before the first step)."""
        return {}


def _restore(
    stage_obj: Stage,
    run_dir: Path | None,
    resume: bool,
    writes: bool,
    optimizer: Any,
    generator: Any,
    log: Any,
    extendable: tuple[str, ...],
) -> tuple[int, int, list[Path]]:
    """(start epoch, step, checkpoints so far) of a stage: on ``resume`` its newest epoch checkpoint is loaded into
    the model, the optimizer, the RNGs and the metrics log; a fresh start removes the stage's stale checkpoints."""
    stage, epochs = stage_obj.name, stage_obj.cfg.epochs
    existing = epoch_checkpoints(run_dir, stage) if run_dir is not None else []
    if not resume:
        # A fresh start owns the stage's checkpoints: stale ones from an earlier run must not be resumed later.
        for _, path in existing if writes else []:
            path.unlink()
        existing = []
    done = [(e, p) for e, p in existing if e <= epochs]
    if not done:
        log.start_stage(stage, [])
        return 0, 0, []
    _, path = done[-1]
    ckpt = load_checkpoint(path, stage=stage)
    require_fields(ckpt, path, "model", "optimizer", "rng", "epoch", "step")
    check_same_config(ckpt, stage_obj.meta, path, extendable)
    load_state_into(stage_obj.model, ckpt["model"], path)
    optimizer.load_state_dict(ckpt["optimizer"])
    generator.set_state(ckpt["rng"]["generator"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    stage_obj.restore_extra(ckpt.get("extra", {}))
    log.start_stage(stage, ckpt.get("metrics_rows"), ckpt["epoch"])
    return ckpt["epoch"], ckpt["step"], [p for _, p in done]


def _optimizer_step(
    stage_obj: Stage,
    train_model: nn.Module,
    batch: Any,
    ctx: StepContext,
    optimizer: Any,
    ranks: Any,
    max_grad_norm: float | None,
    check_each_step: bool,
    device: torch.device,
    precision: str,
) -> tuple[Tensor, dict[str, Any], Tensor | float, str | None]:
    """One step of ``stage_obj``: its loss, backward, the ranks' gradient all-reduce, clipping and Adam; returns
    (loss, statistics, gradient norm, what was non-finite or None). A non-finite step takes no optimizer step."""
    model = stage_obj.model
    stage_obj.model = train_model  # the rank's rows keep autograd; the same model with one process
    try:
        with autocast(device, precision):
            loss, stats = stage_obj.step(batch, ctx)
    finally:
        stage_obj.model = model
    optimizer.zero_grad(set_to_none=True)
    if loss.requires_grad:
        loss.backward()
        if ranks.world > 1:  # the sum of the ranks' row gradients is the whole batch's gradient
            distributed.all_reduce_grads(model.parameters())
        grad_norm = grad_norm_clipped(model.parameters(), max_grad_norm)
        bad = nonfinite_step(loss, grad_norm) if check_each_step else None
        if bad is None:
            optimizer.step()
    else:  # nothing to learn from this batch (e.g. every group dropped): skip, but log it
        grad_norm = 0.0
        bad = nonfinite_step(loss, None) if check_each_step else None
    return loss, stats, grad_norm, bad


def _save_epoch(
    stage_obj: Stage, run_dir: Path, epoch: int, step: int, optimizer: Any, generator: Any, log: Any
) -> Path:
    """Commit the epoch's metrics rows, then write ``{stage}_epoch{epoch}.pt`` (all a resume needs)."""
    stage = stage_obj.name
    log.commit()  # the epoch's rows are durable before the checkpoint that vouches for them
    kill_point(f"{stage}:epoch{epoch}:before_checkpoint")
    payload = {
        "stage": stage,
        "epoch": epoch,
        "step": step,
        "model": stage_obj.model.state_dict(),  # save_checkpoint stores every tensor on the CPU
        "optimizer": optimizer.state_dict(),
        "rng": {"generator": generator.get_state(), "torch": torch.get_rng_state()},
        "extra": stage_obj.extra_state(),
        "metrics_rows": log.packed_stage_rows(stage),  # what a resume from here rebuilds metrics.csv with
        **(stage_obj.meta or {}),
    }
    path = save_checkpoint(run_dir / f"{stage}_epoch{epoch}.pt", payload)
    kill_point(f"{stage}:epoch{epoch}:after_checkpoint")
    return path


def _place_on(device: torch.device, stage_obj: Stage) -> tuple[GroupData, GroupData]:
    """Move the model and the reference to ``device``; return (train, val) there, copied once up front instead of
    once per batch."""
    stage_obj.model.to(device)
    if stage_obj.reference is not None:
        stage_obj.reference.to(device)
    train, val = stage_obj.train, stage_obj.val
    if device.type != "cpu":  # one copy up front instead of one per batch
        train, val = train.to(device), val.to(device)
    return train, val


class _HeldOutEval:
    """The held-out evaluation of a stage, logged and announced as a ``val`` row; the frozen reference's val
    log-probs are scored once per eval temperature and reused."""

    def __init__(self, stage_obj: Stage, val: GroupData, precision: str, log: MetricsLog, callbacks: Any) -> None:
        self.stage_obj, self.val, self.precision, self.log, self.callbacks = stage_obj, val, precision, log, callbacks
        self.ref_logps: dict[float, Tensor] = {}

    def __call__(self, epoch: int, step: int) -> dict[str, Any]:
        stage_obj, reference, val, precision = self.stage_obj, self.stage_obj.reference, self.val, self.precision
        temperature = stage_obj.eval_temperature()
        if reference is not None and temperature not in self.ref_logps:
            self.ref_logps[temperature] = compute_log_probs(reference, val, temperature, precision=precision)
        metrics = evaluate(
            stage_obj.model,
            val,
            temperature=temperature,
            reference=reference,
            ref_logp=self.ref_logps.get(temperature),
            precision=precision,
        )
        metrics.update(stage_obj.eval_extra(epoch))
        row = {"stage": stage_obj.name, "split": "val", "epoch": epoch, "step": step, **metrics}
        self.log.add(row)
        call_callbacks(self.callbacks, "on_eval", row)
        return metrics


@dataclass
class _Loop:
    """What the pieces of one stage's training loop share; :func:`fit` builds it once."""

    stage_obj: Stage
    train_model: nn.Module  # the model, or its SlicedGrad wrapper under torchrun
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    ranks: Any
    device: torch.device
    precision: str
    check_each_step: bool  # the NaN/inf guard runs per step; else on each batch of rows read back
    total_steps: int
    run_dir: Path | None
    checkpoints: list[Path]  # this stage's epoch checkpoints so far (appended to as epochs finish)

    def nonfinite(self, quantity: str, epoch: int, step: int) -> NonFiniteError:
        return nonfinite_error(self.stage_obj.name, quantity, epoch, step, self.checkpoints, self.run_dir)


class _PendingRows:
    """Train rows whose tensor values are not read back yet: one host transfer per flush, then the rows are
    logged and announced in order (and, when the guard is deferred, checked for a NaN/inf loss or gradient)."""

    def __init__(self, loop: _Loop, log: MetricsLog, callbacks: Any, bar: Any) -> None:
        self.loop, self.log, self.callbacks, self.bar = loop, log, callbacks, bar
        self.rows: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def flush(self) -> None:
        pending = self.rows
        if not pending:
            return
        slots = [(row, k) for row in pending for k, v in row.items() if isinstance(v, Tensor)]
        for (row, k), value in zip(slots, as_floats([row[k] for row, k in slots])):
            row[k] = value
        if not self.loop.check_each_step:  # the deferred guard: stop before any of these weights reach a checkpoint
            for row in pending:
                bad = next(
                    (q for q, key in (("loss", "loss"), ("gradient", "grad_norm")) if not math.isfinite(row[key])), None
                )
                if bad is not None:
                    raise self.loop.nonfinite(bad, row["epoch"], row["step"])
        for row in pending:
            self.log.add(row)
            call_callbacks(self.callbacks, "on_step", row)
        self.bar.update(len(pending))
        last = pending[-1]
        self.bar.set_postfix(loss=f"{last['loss']:.4f}", epoch=last["epoch"])
        pending.clear()


def _train_epoch(loop: _Loop, train: GroupData, epoch: int, step: int, rows: _PendingRows, log_every: int) -> int:
    """One epoch of optimizer steps over shuffled mini-batches of ``train``; returns the global step after it.
    A non-finite step stops the stage (``on_nonfinite="stop"``) or is skipped and logged (``"skip_batch"``)."""
    stage_obj, optimizer, generator = loop.stage_obj, loop.optimizer, loop.generator
    cfg, stage = stage_obj.cfg, stage_obj.name
    stage_obj.on_epoch_start(epoch)
    stage_obj.model.train()
    for batch in iterate_batches(train, cfg.batch_size, shuffle=True, generator=generator):
        ctx = StepContext(epoch=epoch, step=step, total_steps=loop.total_steps, generator=generator)
        loss, stats, grad_norm, bad = _optimizer_step(
            stage_obj,
            loop.train_model,
            batch,
            ctx,
            optimizer,
            loop.ranks,
            cfg.max_grad_norm,
            loop.check_each_step,
            loop.device,
            loop.precision,
        )
        if bad is not None:
            if cfg.on_nonfinite == "stop":
                raise loop.nonfinite(bad, epoch, step + 1)
            optimizer.zero_grad(set_to_none=True)
        if cfg.on_nonfinite == "skip_batch":
            stats = {**stats, "skipped_nonfinite": int(bad is not None)}
        step += 1
        kill_point(f"{stage}:epoch{epoch}:step{step}")
        rows.append(
            {
                "stage": stage,
                "split": "train",
                "epoch": epoch,
                "step": step,
                "loss": loss.detach(),
                **stats,
                "grad_norm": grad_norm,
                "lr": optimizer.param_groups[0]["lr"],
            }
        )
        if len(rows) >= log_every:
            rows.flush()
    rows.flush()
    return step


def _stage_result(
    stage_obj: Stage, log: MetricsLog, metrics: dict[str, Any], checkpoints: list[Path], info: dict[str, Any]
) -> StageResult:
    """The stage's :class:`StageResult`; a resumed finished stage reports its last logged evaluation."""
    stage = stage_obj.name
    history = log.frame(stage)
    if not metrics:  # resumed a finished stage: report its last logged evaluation
        last = history[history["split"] == "val"].iloc[-1]
        metrics = {k: float(v) for k, v in last.items() if k not in ("stage", "split", "epoch", "step") and pd.notna(v)}
    if "skipped_nonfinite" in history.columns:
        info["skipped_batches"] = int(history["skipped_nonfinite"].fillna(0).sum())
    return StageResult(
        stage=stage, model=stage_obj.model, history=history, final_metrics=metrics, checkpoints=checkpoints, info=info
    )


def fit(stage_obj: Stage, run: RunContext) -> StageResult:
    """Train ``stage_obj.model`` in place for ``cfg.epochs`` with Adam at ``cfg.lr``; see the module docstring.

    ``run.device``: where the model, the reference and the batches live (``train``/``val`` are copied there once);
    ``run.precision="bf16"`` runs the steps and the evaluations under CUDA autocast. ``run.log_every``: steps
    between host reads of the per-step statistics (one sync each time, and at every epoch end); ``metrics.csv``
    still gets one row per step with the same values, and callbacks get every row, in batches.
    ``cfg.on_nonfinite``: ``"stop"`` raises :class:`NonFiniteError` at a NaN/inf loss or gradient; ``"skip_batch"``
    leaves such a batch out (no optimizer step) and logs it in a ``skipped_nonfinite`` column (1 = skipped).
    Non-finite weights at an epoch's end always stop (before its checkpoint).
    """
    cfg, stage, model = stage_obj.cfg, stage_obj.name, stage_obj.model
    epochs, on_nonfinite, callbacks, log_every = cfg.epochs, cfg.on_nonfinite, run.callbacks, run.log_every
    check_optim_fields(stage, epochs, cfg.lr, cfg.batch_size, cfg.max_grad_norm)
    check_on_nonfinite(stage, on_nonfinite)
    extendable = (*stage_obj.extendable, "on_nonfinite")  # how bad batches are handled does not change the past
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    device = torch.device(run.device)
    train, val = _place_on(device, stage_obj)
    # The NaN/inf guard reads the loss and grad norm on the host. Per step on the CPU (free there) and whenever a
    # bad batch must be skipped before its update; on an accelerator with on_nonfinite="stop" it runs on each
    # batch of rows read back every log_every steps instead, so the step itself never waits for the device: a
    # non-finite step still stops the stage before its weights can reach a checkpoint.
    check_each_step = device.type == "cpu" or on_nonfinite == "skip_batch"
    run_dir = None if run.run_dir is None else Path(run.run_dir)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
    # Under torchrun every rank trains the same model (see v3kit/train/distributed.py); only rank 0 writes files.
    ranks = distributed.current()
    writes = run_dir if ranks.main else None
    train_model = SlicedGrad(model, ranks) if ranks.world > 1 else model
    log = stage_log(run.metrics_log, writes)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(run.seed)
    torch.manual_seed(run.seed)
    steps_per_epoch = num_batches(len(train), cfg.batch_size)
    total_steps = steps_per_epoch * epochs
    evaluate_now = _HeldOutEval(stage_obj, val, run.precision, log, callbacks)

    start_epoch, step, checkpoints = _restore(
        stage_obj, run_dir, run.resume, writes is not None, optimizer, generator, log, extendable
    )
    loop = _Loop(
        stage_obj,
        train_model,
        optimizer,
        generator,
        ranks,
        device,
        run.precision,
        check_each_step,
        total_steps,
        run_dir,
        checkpoints,
    )

    info = {"epochs": epochs, "steps_per_epoch": steps_per_epoch, "resumed_from_epoch": start_epoch}
    call_callbacks(callbacks, "on_stage_start", stage, total_steps, info)
    metrics = evaluate_now(0, 0) if start_epoch == 0 else {}

    bar = tqdm(total=total_steps, initial=step, desc=stage, disable=not run.progress, leave=False, dynamic_ncols=True)
    rows = _PendingRows(loop, log, callbacks, bar)
    try:
        for epoch in range(start_epoch + 1, epochs + 1):
            step = _train_epoch(loop, train, epoch, step, rows, log_every)
            if not weights_finite(model):
                raise loop.nonfinite("weights", epoch, step)
            metrics = evaluate_now(epoch, step)
            if writes is not None:
                checkpoints.append(_save_epoch(stage_obj, run_dir, epoch, step, optimizer, generator, log))
    finally:  # also at a stop (NaN, a pruned search trial, Ctrl-C): release metrics.csv's descriptor
        bar.close()
        log.close()
    distributed.barrier()  # rank 0's files are complete before any rank reads them

    result = _stage_result(stage_obj, log, metrics, checkpoints, info)
    call_callbacks(callbacks, "on_stage_end", stage, result)
    return result
