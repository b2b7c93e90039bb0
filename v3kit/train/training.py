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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..bounds import check_max
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
from .metrics_log import Callback, MetricsLog, _call  # noqa: F401 - Callback: v3kit.training.Callback (documented)
from .model import compute_log_probs


@dataclass
class StepContext:
    """What ``step_fn`` may need besides the batch."""

    epoch: int  # 1-based epoch in progress
    step: int  # 0-based global step of this stage (number of optimizer steps done before this one)
    total_steps: int
    generator: torch.Generator  # seeded; use it for any sampling so runs are reproducible and resumable


def split_rows(history: pd.DataFrame, split: str) -> pd.DataFrame:
    """The ``train`` (per step) or ``val`` (per epoch) rows of a metrics history."""
    return history[history["split"] == split].reset_index(drop=True)


@dataclass
class StageResult:
    stage: str
    model: nn.Module
    history: pd.DataFrame  # this stage's rows of metrics.csv
    final_metrics: dict[str, float]  # held-out metrics after the last epoch
    checkpoints: list[Path] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def train_history(self) -> pd.DataFrame:
        return split_rows(self.history, "train")

    @property
    def eval_history(self) -> pd.DataFrame:
        return split_rows(self.history, "val")


# ``stats`` values may be floats or 0-d tensors; tensors are read back to the host in batches (see ``log_every``).


def _grad_norm(params: Iterable[nn.Parameter], max_norm: float | None) -> Tensor | float:
    """Clip and return the total gradient norm, as a 0-d tensor on the parameters' device (no host sync)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else math.inf)


ON_NONFINITE = ("stop", "skip_batch")


class NonFiniteError(RuntimeError):
    """Training produced a NaN/inf loss, gradient or weight; the message names stage, epoch, step, quantity and the
    last good checkpoint. Nothing non-finite is ever checkpointed."""


def check_on_nonfinite(section: str, value: str) -> None:
    if value not in ON_NONFINITE:
        raise ValueError(f"{section}.on_nonfinite must be one of {ON_NONFINITE}, got {value!r}")


def _nonfinite_step(loss: Tensor, grad_norm: float | Tensor | None) -> str | None:
    """``None`` if the step is finite, else which quantity is not. One fused check (a single host sync); the grad
    norm is the one ``clip_grad_norm_`` already computed, and is non-finite iff some gradient is."""
    vals = loss.detach().reshape(()).float()
    if grad_norm is not None:
        vals = torch.stack([vals, torch.as_tensor(grad_norm, dtype=torch.float32)])
    if bool(torch.isfinite(vals).all()):
        return None
    return "loss" if not math.isfinite(float(loss)) else "gradient"


def _weights_finite(model: nn.Module) -> bool:
    flags = [torch.isfinite(p).all() for p in model.parameters()]
    return not flags or bool(torch.stack(flags).all())


def _nonfinite_error(
    stage: str, quantity: str, epoch: int, step: int, checkpoints: list[Path], run_dir: Path | None
) -> NonFiniteError:
    last = (
        (str(checkpoints[-1]) if checkpoints else "none of this stage yet")
        if run_dir is not None
        else "none (no run_dir)"
    )
    return NonFiniteError(
        f"{stage}: non-finite {quantity} at epoch {epoch}, step {step}; stopped without checkpointing it "
        f"(last good checkpoint: {last}). Lower {stage}.lr, check the data's feature scale, or set "
        f"{stage}.on_nonfinite=skip_batch to skip such batches"
    )


def _kill_point(name: str) -> None:
    """Crash tests only: ``V3KIT_TEST_KILL_AT=<name>`` SIGKILLs the process here (e.g. ``grpo:epoch2:step7``,
    ``rce:epoch1:before_checkpoint``, ``grpo:epoch2:after_checkpoint``), a deterministic stand-in for a crash."""
    if os.environ.get("V3KIT_TEST_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


# Every epoch writes a checkpoint: 10,000 epochs is already far past any run of this kit (the seed ran 15/3/8),
# while a typo such as 1e20 would fill the disk with them. A batch of a million groups is past any dataset that fits
# in memory; a larger value is a typo, not a full-batch request.
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 1_000_000


def check_optim_fields(section: str, epochs: int, lr: float, batch_size: int, max_grad_norm: float | None) -> None:
    """Validate a stage config's optimisation knobs at construction, long before any training runs."""
    if epochs < 0:
        raise ValueError(f"{section}.epochs must be >= 0 (0 skips the stage), got {epochs}")
    check_max(f"{section}.epochs", epochs, MAX_EPOCHS, "each epoch writes a checkpoint; is the value a typo?")
    check_max(
        f"{section}.batch_size",
        batch_size,
        MAX_BATCH_SIZE,
        "more groups than any in-memory dataset; use a smaller batch",
    )
    if not lr > 0:
        raise ValueError(f"{section}.lr must be > 0, got {lr}")
    if batch_size < 1:
        raise ValueError(f"{section}.batch_size must be >= 1, got {batch_size}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"{section}.max_grad_norm must be > 0 or null (no clipping), got {max_grad_norm}")


def _check_same_config(
    ckpt: dict[str, Any], meta: dict[str, Any] | None, path: Path, extendable: Sequence[str]
) -> None:
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
class OptimConfig:
    """The optimisation knobs every stage has; ``SFTConfig``, ``RCEConfig`` and ``GRPOConfig`` extend it with their
    own defaults and switches. ``section`` names the config section in error messages."""

    epochs: int = 1
    """Epochs of this stage; 0 skips it; at most 10,000 (``MAX_EPOCHS``)."""
    lr: float = 1e-5
    """Adam learning rate."""
    batch_size: int = 32
    """Groups per optimizer step; at most 1,000,000 (``MAX_BATCH_SIZE``)."""
    max_grad_norm: float | None = 1.0
    """Gradient-norm clipping; null = none."""
    weight_decay: float = 0.0
    """Adam's L2 penalty on the weights (``torch.optim.Adam``'s ``weight_decay``); 0 = none."""
    on_nonfinite: str = "stop"
    """A NaN/inf loss or gradient: ``stop`` (raise, naming epoch, step and the last good checkpoint) or
    ``skip_batch`` (no optimizer step for that batch; counted in the ``skipped_nonfinite`` column of
    ``metrics.csv`` and in the run printout)."""

    section = "stage"  # a plain class attribute (not a field): the config section, for messages

    def __post_init__(self) -> None:
        check_optim_fields(self.section, self.epochs, self.lr, self.batch_size, self.max_grad_norm)
        check_on_nonfinite(self.section, self.on_nonfinite)
        if not (self.weight_decay >= 0):
            raise ValueError(f"{self.section}.weight_decay must be >= 0, got {self.weight_decay}")


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
    _check_same_config(ckpt, stage_obj.meta, path, extendable)
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
        grad_norm = _grad_norm(model.parameters(), max_grad_norm)
        bad = _nonfinite_step(loss, grad_norm) if check_each_step else None
        if bad is None:
            optimizer.step()
    else:  # nothing to learn from this batch (e.g. every group dropped): skip, but log it
        grad_norm = 0.0
        bad = _nonfinite_step(loss, None) if check_each_step else None
    return loss, stats, grad_norm, bad


def _save_epoch(
    stage_obj: Stage, run_dir: Path, epoch: int, step: int, optimizer: Any, generator: Any, log: Any
) -> Path:
    """Commit the epoch's metrics rows, then write ``{stage}_epoch{epoch}.pt`` (all a resume needs)."""
    stage = stage_obj.name
    log.commit()  # the epoch's rows are durable before the checkpoint that vouches for them
    _kill_point(f"{stage}:epoch{epoch}:before_checkpoint")
    payload = {
        "stage": stage,
        "epoch": epoch,
        "step": step,
        "model": stage_obj.model.state_dict(),  # save_checkpoint stores every tensor on the CPU
        "optimizer": optimizer.state_dict(),
        "rng": {"generator": generator.get_state(), "torch": torch.get_rng_state()},
        "extra": stage_obj.extra_state(),
        "metrics_rows": log.stage_rows(stage),  # what a resume from here rebuilds metrics.csv with
        **(stage_obj.meta or {}),
    }
    path = save_checkpoint(run_dir / f"{stage}_epoch{epoch}.pt", payload)
    _kill_point(f"{stage}:epoch{epoch}:after_checkpoint")
    return path


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
    cfg, stage, model, reference = stage_obj.cfg, stage_obj.name, stage_obj.model, stage_obj.reference
    train, val = stage_obj.train, stage_obj.val
    epochs, lr, batch_size, max_grad_norm, on_nonfinite = (
        cfg.epochs,
        cfg.lr,
        cfg.batch_size,
        cfg.max_grad_norm,
        cfg.on_nonfinite,
    )
    seed, run_dir, resume, callbacks, progress = run.seed, run.run_dir, run.resume, run.callbacks, run.progress
    device, precision, log_every = run.device, run.precision, run.log_every
    check_optim_fields(stage, epochs, lr, batch_size, max_grad_norm)
    check_on_nonfinite(stage, on_nonfinite)
    extendable = (*stage_obj.extendable, "on_nonfinite")  # how bad batches are handled does not change the past
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    device = torch.device(device)
    model.to(device)
    if reference is not None:
        reference.to(device)
    if device.type != "cpu":  # one copy up front instead of one per batch
        train, val = train.to(device), val.to(device)
    # The NaN/inf guard reads the loss and grad norm on the host. Per step on the CPU (free there) and whenever a
    # bad batch must be skipped before its update; on an accelerator with on_nonfinite="stop" it runs on each
    # batch of rows read back every log_every steps instead, so the step itself never waits for the device: a
    # non-finite step still stops the stage before its weights can reach a checkpoint.
    check_each_step = device.type == "cpu" or on_nonfinite == "skip_batch"
    run_dir = None if run_dir is None else Path(run_dir)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
    # Under torchrun every rank trains the same model (see v3kit/train/distributed.py); only rank 0 writes files.
    ranks = distributed.current()
    writes = run_dir if ranks.main else None
    train_model = distributed.SlicedGrad(model, ranks) if ranks.world > 1 else model
    log = MetricsLog(writes)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    steps_per_epoch = num_batches(len(train), batch_size)
    total_steps = steps_per_epoch * epochs

    ref_logps: dict[float, Tensor] = {}  # the frozen reference's val log-probs, per eval temperature: scored once

    def evaluate_now(epoch: int, step: int) -> dict[str, Any]:
        temperature = stage_obj.eval_temperature()
        if reference is not None and temperature not in ref_logps:
            ref_logps[temperature] = compute_log_probs(reference, val, temperature, precision=precision)
        metrics = evaluate(
            model,
            val,
            temperature=temperature,
            reference=reference,
            ref_logp=ref_logps.get(temperature),
            precision=precision,
        )
        metrics.update(stage_obj.eval_extra(epoch))
        row = {"stage": stage, "split": "val", "epoch": epoch, "step": step, **metrics}
        log.add(row)
        _call(callbacks, "on_eval", row)
        return metrics

    start_epoch, step, checkpoints = _restore(
        stage_obj, run_dir, resume, writes is not None, optimizer, generator, log, extendable
    )

    info = {"epochs": epochs, "steps_per_epoch": steps_per_epoch, "resumed_from_epoch": start_epoch}
    _call(callbacks, "on_stage_start", stage, total_steps, info)
    metrics = evaluate_now(0, 0) if start_epoch == 0 else {}

    bar = tqdm(total=total_steps, initial=step, desc=stage, disable=not progress, leave=False, dynamic_ncols=True)
    pending: list[dict[str, Any]] = []  # train rows whose tensor values are not read back yet

    def flush_rows() -> None:
        """Read every pending tensor value back in one transfer, then log and announce the rows in order."""
        if not pending:
            return
        slots = [(row, k) for row in pending for k, v in row.items() if isinstance(v, Tensor)]
        for (row, k), value in zip(slots, as_floats([row[k] for row, k in slots])):
            row[k] = value
        if not check_each_step:  # the deferred guard: stop before any of these weights reach a checkpoint
            for row in pending:
                bad = next(
                    (q for q, key in (("loss", "loss"), ("gradient", "grad_norm")) if not math.isfinite(row[key])), None
                )
                if bad is not None:
                    raise _nonfinite_error(stage, bad, row["epoch"], row["step"], checkpoints, run_dir)
        for row in pending:
            log.add(row)
            _call(callbacks, "on_step", row)
        bar.update(len(pending))
        last = pending[-1]
        bar.set_postfix(loss=f"{last['loss']:.4f}", epoch=last["epoch"])
        pending.clear()

    try:
        for epoch in range(start_epoch + 1, epochs + 1):
            stage_obj.on_epoch_start(epoch)
            model.train()
            for batch in iterate_batches(train, batch_size, shuffle=True, generator=generator):
                ctx = StepContext(epoch=epoch, step=step, total_steps=total_steps, generator=generator)
                loss, stats, grad_norm, bad = _optimizer_step(
                    stage_obj,
                    train_model,
                    batch,
                    ctx,
                    optimizer,
                    ranks,
                    max_grad_norm,
                    check_each_step,
                    device,
                    precision,
                )
                if bad is not None:
                    if on_nonfinite == "stop":
                        raise _nonfinite_error(stage, bad, epoch, step + 1, checkpoints, run_dir)
                    optimizer.zero_grad(set_to_none=True)
                if on_nonfinite == "skip_batch":
                    stats = {**stats, "skipped_nonfinite": int(bad is not None)}
                step += 1
                _kill_point(f"{stage}:epoch{epoch}:step{step}")
                pending.append(
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
                if len(pending) >= log_every:
                    flush_rows()
            flush_rows()
            if not _weights_finite(model):
                raise _nonfinite_error(stage, "weights", epoch, step, checkpoints, run_dir)
            metrics = evaluate_now(epoch, step)
            if writes is not None:
                checkpoints.append(_save_epoch(stage_obj, run_dir, epoch, step, optimizer, generator, log))
    except BaseException:  # a stop (NaN, a pruned search trial, Ctrl-C): release metrics.csv's descriptor
        bar.close()
        log.close()
        raise
    bar.close()
    log.close()
    distributed.barrier()  # rank 0's files are complete before any rank reads them

    history = log.frame(stage)
    if not metrics:  # resumed a finished stage: report its last logged evaluation
        last = history[history["split"] == "val"].iloc[-1]
        metrics = {k: float(v) for k, v in last.items() if k not in ("stage", "split", "epoch", "step") and pd.notna(v)}
    if "skipped_nonfinite" in history.columns:
        info["skipped_batches"] = int(history["skipped_nonfinite"].fillna(0).sum())
    result = StageResult(
        stage=stage, model=model, history=history, final_metrics=metrics, checkpoints=checkpoints, info=info
    )
    _call(callbacks, "on_stage_end", stage, result)
    return result
