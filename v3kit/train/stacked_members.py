"""One member of a stacked stage (:mod:`v3kit.train.stacked`) and its own bookkeeping: everything a member does as
its sequential run would, apart from the shared forward and backward passes. Its optimizer holds its Adam state in
torch's layout for its checkpoints, its generator draws its batch order and sampling, and it keeps its own
evaluations, ``metrics.csv`` rows, epoch checkpoints (the payload :func:`v3kit.train.training.fit` writes) and
result. The lockstep loop that drives the members is :mod:`v3kit.train.stacked`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from .checkpoint import load_checkpoint, load_state_into, require_fields, save_checkpoint
from .device import as_floats
from .metrics import evaluate
from .metrics_log import MetricsLog, call_callbacks, stage_log
from .model import compute_log_probs
from .optim import nonfinite_error
from .stacked_losses import Ref
from .training import RunContext, Stage, StageResult, check_same_config, kill_point


class MemberPruned(RuntimeError):
    """A member stopped early by ``prune`` (its files hold every epoch up to the one it was pruned at)."""


@dataclass
class Member:
    """One member's state: its stage and run, its log and files, its generator and RNG state, and whether it
    stopped (``error``: a non-finite step or :class:`MemberPruned`)."""

    stage: Stage
    run: RunContext
    run_dir: Path | None
    log: MetricsLog
    optimizer: torch.optim.Adam  # not stepped: holds the member's Adam state in torch's layout for its checkpoints
    generator: torch.Generator
    torch_state: Tensor  # torch's global RNG state a sequential run would have (saved in its checkpoints)
    checkpoints: list[Path] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    error: BaseException | None = None
    order: Tensor | None = None

    @property
    def active(self) -> bool:
        return self.error is None

    @classmethod
    def start(cls, stage: Stage, run: RunContext, device: torch.device) -> Member:
        """The member of ``stage`` under ``run``, its model and data on ``device``, seeded as ``fit`` seeds."""
        stage.model.to(device)
        if stage.reference is not None:
            stage.reference.to(device)
        if device.type != "cpu":
            stage.train, stage.val = stage.train.to(device), stage.val.to(device)
        run_dir = None if run.run_dir is None else Path(run.run_dir)
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(run.seed)
        return cls(
            stage=stage,
            run=run,
            run_dir=run_dir,
            log=stage_log(run.metrics_log, run_dir),
            optimizer=torch.optim.Adam(
                stage.model.parameters(), lr=stage.cfg.lr, weight_decay=getattr(stage.cfg, "weight_decay", 0.0)
            ),
            generator=torch.Generator().manual_seed(run.seed),
            torch_state=torch.get_rng_state(),
        )

    def load(self, name: str, path: Path) -> int:
        """Restore the member from its epoch checkpoint ``path`` of stage ``name``; the step it was written at."""
        ckpt = load_checkpoint(path, stage=name)
        require_fields(ckpt, path, "model", "optimizer", "rng", "epoch", "step")
        check_same_config(ckpt, self.stage.meta, path, (*self.stage.extendable, "on_nonfinite"))
        load_state_into(self.stage.model, ckpt["model"], path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.generator.set_state(ckpt["rng"]["generator"])
        self.torch_state = ckpt["rng"]["torch"]
        self.stage.restore_extra(ckpt.get("extra", {}))
        self.log.start_stage(name, ckpt.get("metrics_rows"), ckpt["epoch"])
        return int(ckpt["step"])

    def ref_log_probs(self, precision: str, ref_logps: dict[tuple[int, int, float], Tensor]) -> Tensor | None:
        """The frozen reference's held-out log-probs (None without a reference); ``ref_logps`` caches them, so a
        reference the members share is scored once."""
        stage = self.stage
        if stage.reference is None:
            return None
        key = (id(stage.reference), id(stage.val), stage.eval_temperature())
        if key not in ref_logps:
            ref_logps[key] = compute_log_probs(stage.reference, stage.val, key[2], precision=precision)
        return ref_logps[key]

    def evaluate(
        self,
        name: str,
        epoch: int,
        step: int,
        precision: str,
        ref_logps: dict[tuple[int, int, float], Tensor],
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Log the member's held-out metrics: ``metrics`` when the stack computed them, else ``evaluate()``'s of
        its own model."""
        stage = self.stage
        if metrics is None:
            metrics = evaluate(
                stage.model,
                stage.val,
                temperature=stage.eval_temperature(),
                reference=stage.reference,
                ref_logp=self.ref_log_probs(precision, ref_logps),
                precision=precision,
            )
        metrics = {**metrics, **stage.eval_extra(epoch)}
        row = {"stage": name, "split": "val", "epoch": epoch, "step": step, **metrics}
        self.log.add(row)
        call_callbacks(self.run.callbacks, "on_eval", row)
        self.metrics = metrics

    def payload(self, name: str, epoch: int, step: int) -> dict[str, Any]:
        """What the member's epoch checkpoint holds: the same payload :func:`fit` writes, but for its optimizer
        state, which :meth:`write` adds from the stack's Adam state. The weights are copies: the payload is written
        in the background while the stack trains on."""
        return {
            "stage": name,
            "epoch": epoch,
            "step": step,
            "model": {key: t.clone() for key, t in self.stage.model.state_dict().items()},
            "optimizer": None,  # filled in by write (the key keeps fit's order of the payload)
            "rng": {"generator": self.generator.get_state(), "torch": self.torch_state},
            "extra": self.stage.extra_state(),
            "metrics_rows": self.log.packed_stage_rows(name),
            **(self.stage.meta or {}),
        }

    def optimizer_state(self, adam_state: list[dict[str, Tensor]]) -> dict[str, Any]:
        """The member's optimizer ``state_dict()`` holding ``adam_state`` (its Adam state per parameter, from the
        stack), as its sequential run's optimizer would give it."""
        self.optimizer.state.clear()
        for p, s in zip(self.stage.model.parameters(), adam_state):
            if s["step"] > 0:
                self.optimizer.state[p] = s
        return self.optimizer.state_dict()

    def checkpoint_path(self, name: str, epoch: int) -> tuple[Path, Callable[[], None]]:
        """Name the epoch's checkpoint, which :meth:`write` then writes, and what makes the member's metrics rows
        durable (:meth:`MetricsLog.commit_later`: :meth:`write` calls it first, so the epoch's rows are on disk
        before the checkpoint that vouches for them)."""
        path = self.run_dir / f"{name}_epoch{epoch}.pt"  # type: ignore[operator]
        self.checkpoints.append(path)
        return path, self.log.commit_later()

    def write(
        self,
        name: str,
        epoch: int,
        path: Path,
        payload: dict[str, Any],
        adam_state: Callable[[], list[Any]],
        commit: Callable[[], None],
    ) -> None:
        """Write one epoch checkpoint after ``commit()`` (its metrics rows durable first), its optimizer state from
        ``adam_state()``. Called on the stack's writer thread: the fsyncs, splitting the Adam state and the pickling
        overlap the next epoch's steps, whose torch operations release the GIL; nothing else touches the member's
        optimizer while the stack trains."""
        commit()
        payload["optimizer"] = self.optimizer_state(adam_state())
        kill_point(f"{name}:epoch{epoch}:before_checkpoint")
        save_checkpoint(path, payload)
        kill_point(f"{name}:epoch{epoch}:after_checkpoint")

    def flush(self, name: str, check_each_step: bool, read: dict[int, list[float]] | None = None) -> None:
        """Log the member's pending training rows, their stacked values read back to numbers; without
        ``check_each_step``, a non-finite loss or gradient among them stops the member here. ``read``: the values
        already read back, shared by the members flushed together (a statistic ``[K]`` crosses to the host once
        for all of them, not once per member)."""
        if not self.pending:
            return
        read = {} if read is None else read
        slots = []  # (row, key) of a value still a tensor (a member's own Stage.step statistic)
        for row in self.pending:
            for key, v in row.items():
                kind = type(v)
                if kind is Ref:
                    if id(v.values) not in read:
                        read[id(v.values)] = v.values.tolist()
                    row[key] = read[id(v.values)][v.j]
                elif kind is not float and kind is not int and isinstance(v, Tensor):
                    slots.append((row, key))
        for (row, key), value in zip(slots, as_floats([row[key] for row, key in slots])):
            row[key] = value
        if not check_each_step:
            for row in self.pending:
                for q, key in (("loss", "loss"), ("gradient", "grad_norm")):
                    if self.error is None and not math.isfinite(row[key]):
                        self.error = nonfinite_error(name, q, row["epoch"], row["step"], self.checkpoints, self.run_dir)
        self.log.add_many(self.pending)
        for row in self.pending:
            call_callbacks(self.run.callbacks, "on_step", row)
        self.pending.clear()

    def result(self, name: str, info: dict[str, Any]) -> StageResult | BaseException:
        """Close the member's log; its :class:`StageResult` (``info`` completed), or the exception that stopped it."""
        self.log.close()
        if self.error is not None and not isinstance(self.error, MemberPruned):
            return self.error
        history = self.log.frame(name)
        metrics = self.metrics
        if not metrics:  # resumed a finished stage: its last logged evaluation
            last = history[history["split"] == "val"].iloc[-1]
            metrics = {k: float(v) for k, v in last.items() if k not in ("stage", "split", "epoch", "step") and v == v}
        if "skipped_nonfinite" in history.columns:
            info["skipped_batches"] = int(history["skipped_nonfinite"].fillna(0).sum())
        if isinstance(self.error, MemberPruned):
            info["pruned"] = True
        result = StageResult(name, self.stage.model, history, metrics, self.checkpoints, info)
        call_callbacks(self.run.callbacks, "on_stage_end", name, result)
        return result
