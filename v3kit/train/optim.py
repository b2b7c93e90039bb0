"""The optimisation knobs every stage has and the guards around its optimizer step.

:class:`OptimConfig` (``epochs``, ``lr``, ``batch_size``, ``max_grad_norm``, ``weight_decay``, ``on_nonfinite``)
with the checks it runs at construction (also used by :mod:`v3kit.train.stacked`, whose members have one each), the
clipped gradient norm, and the non-finite checks of a step: one fused finiteness check on the loss and the gradient
norm, one on the weights before a checkpoint, and :class:`NonFiniteError` naming where it happened.
:mod:`v3kit.train.training` re-exports all of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor, nn

from ..bounds import check_max

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


def grad_norm_clipped(params: Iterable[nn.Parameter], max_norm: float | None) -> Tensor | float:
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


def nonfinite_step(loss: Tensor, grad_norm: float | Tensor | None) -> str | None:
    """``None`` if the step is finite, else which quantity is not. One fused check (a single host sync); the grad
    norm is the one ``clip_grad_norm_`` already computed, and is non-finite iff some gradient is."""
    vals = loss.detach().reshape(()).float()
    if grad_norm is not None:
        vals = torch.stack([vals, torch.as_tensor(grad_norm, dtype=torch.float32)])
    if bool(torch.isfinite(vals).all()):
        return None
    return "loss" if not math.isfinite(float(loss)) else "gradient"


def weights_finite(model: nn.Module) -> bool:
    flags = [torch.isfinite(p).all() for p in model.parameters()]
    return not flags or bool(torch.stack(flags).all())


def nonfinite_error(
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
