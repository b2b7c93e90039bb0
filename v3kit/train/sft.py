"""SFT (the "v2" checkpoint) and stage 1 of v3: load it, freeze a reference copy, compute ``old_log_probs``."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.contract import Batch, GroupData, Splits
from . import distributed
from .checkpoint import (
    check_feature_dims,
    checkpoint_model_config,
    load_checkpoint,
    model_from_checkpoint,
    model_payload,
    save_checkpoint,
)
from .metrics import evaluate
from .model import ModelConfig, attach_interface, build_model, compute_log_probs, model_inputs, policy_log_probs
from .selection import BestVal, best_epoch
from .training import OptimConfig, RunContext, Stage, StageResult, StepContext, fit


@dataclass
class SFTConfig(OptimConfig):
    epochs: int = 15
    """Epochs of supervised training (CE on the human label); at most 10,000."""
    lr: float = 1e-3
    batch_size: int = 64
    checkpoint: str | None = None
    """A v2 SFT checkpoint to start from instead of training one (the same as ``v3kit run --sft CKPT``; its model
    replaces ``model.*``). ``v3kit investigate`` writes it into the configs it recommends, so they start from the
    SFT model you have."""

    section = "sft"


class SFTStage(Stage):
    """The supervised ("v2") ranker: cross-entropy on the human label, ``-log pi(label | q)``."""

    name = "sft"

    def step(self, batch: Batch, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        logp = policy_log_probs(self.model, *model_inputs(self.model, batch), batch.mask, self.temperature)
        return -logp.gather(1, batch.labels.unsqueeze(1)).mean(), {}


def _keep_best(
    model: nn.Module, result: StageResult, tracker: BestVal, init: dict[str, torch.Tensor], run_dir: Any, metric: str
) -> int:
    """Load the weights of SFT's best val epoch (0: the initial model) into ``model``; returns that epoch. The
    logged rows decide (a resumed SFT's tracker missed the epochs before the resume); the weights come from the
    tracker, the initial state, or that epoch's checkpoint."""
    val = result.history[result.history["split"] == "val"] if len(result.history) else result.history
    best = best_epoch(val, metric)
    last = int(result.info["epochs"])
    if best is None or best[0] == last:
        return last
    epoch = best[0]
    if tracker.epoch == epoch and tracker.state is not None:
        state = tracker.state
    elif epoch == 0:
        state = init
    else:
        state = load_checkpoint(Path(run_dir) / f"sft_epoch{epoch}.pt")["model"]
    model.load_state_dict(state)
    return epoch


def train_sft(
    splits: Splits,
    model_cfg: ModelConfig,
    cfg: SFTConfig | None = None,
    *,
    select_metric: str | None = None,
    **run: Any,
) -> StageResult:
    """Train the supervised ranker (CE on the human label) and save ``sft.pt`` in ``run_dir``.

    ``run``: the fields of a :class:`v3kit.train.training.RunContext` (seed, run_dir, resume, callbacks, progress,
    device, precision, log_every); ``sft.pt`` holds CPU tensors. ``select_metric`` (a run's ``select: best_val``):
    ``sft.pt`` and the returned model are SFT's best val epoch on it, epoch 0 (the initial model) included, so an
    SFT that only hurts val ships its start; ``result.info["selected_epoch"]`` says which.
    """
    cfg = cfg or SFTConfig()
    context = RunContext(**run)
    torch.manual_seed(context.seed)
    model = build_model(model_cfg, splits.train.query_dim, splits.train.cand_dim)
    meta = {"config": asdict(cfg), **model_payload(model_cfg, splits.train.query_dim, splits.train.cand_dim)}
    stage = SFTStage(model, splits.train, splits.val, cfg, temperature=model_cfg.sim_temperature, meta=meta)
    tracker, init = None, {}
    if select_metric is not None:
        init = {k: t.detach().clone() for k, t in model.state_dict().items()}
        tracker = BestVal(model, "sft", select_metric)
        context = dataclasses.replace(context, callbacks=[*context.callbacks, tracker])
    result = fit(stage, context)
    epoch = cfg.epochs
    if tracker is not None:
        epoch = _keep_best(model, result, tracker, init, context.run_dir, select_metric)  # type: ignore[arg-type]
    result.info["selected_epoch"] = epoch
    if context.run_dir is not None:
        path = Path(context.run_dir) / "sft.pt"
        if distributed.current().main:  # under torchrun every rank holds the same model; rank 0 writes it
            payload = {"stage": "sft", "epoch": epoch, "step": -1, "model": model.state_dict(), **meta}
            save_checkpoint(path, payload)
        distributed.barrier()
        result.info["checkpoint"] = path
    return result


@dataclass
class Stage1:
    """Output of stage 1: the trainable policy, its frozen SFT reference, and ``old_log_probs`` on train."""

    policy: nn.Module
    reference: nn.Module
    old_log_probs: torch.Tensor  # [N_train, G], -inf at padding
    temperature: float  # logit temperature the old log-probs were computed at
    model_config: ModelConfig
    checkpoint: Path | None = None
    origin: str = "loaded"  # how the run dir got its SFT checkpoint (notebooks): "trained" | "reused" | "given"


def freeze(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def load_sft(
    checkpoint: str | Path | nn.Module,
    train: GroupData,
    *,
    temperature: float | None = None,
    model_config: ModelConfig | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> Stage1:
    """Stage 1: load the v2 SFT checkpoint (or take a model), copy it frozen, and compute ``old_log_probs``.

    ``temperature`` defaults to the checkpoint's ``model.sim_temperature``. The policy, the reference and
    ``old_log_probs`` are on ``device`` (a checkpoint is always read to the CPU first, so any device loads any
    checkpoint).
    """
    path = None
    if isinstance(checkpoint, nn.Module):
        policy = copy.deepcopy(checkpoint)
        model_config = model_config or ModelConfig()
        if model_config.interface != "auto" or model_config.methods:  # a model built outside build_model
            attach_interface(policy, model_config)
    else:
        path = Path(checkpoint)
        ckpt = load_checkpoint(path)
        policy = model_from_checkpoint(ckpt, path)
        model_config = checkpoint_model_config(ckpt, path)
        check_feature_dims(ckpt, train.query_dim, train.cand_dim, path, "use the matching data")
    temperature = model_config.sim_temperature if temperature is None else temperature
    policy.to(device)
    reference = freeze(policy)
    old = compute_log_probs(reference, train, temperature, precision=precision)
    return Stage1(
        policy=policy,
        reference=reference,
        old_log_probs=old,
        temperature=temperature,
        model_config=model_config,
        checkpoint=path,
    )


def sft_baseline(stage1: Stage1, data: GroupData) -> dict[str, float]:
    """Held-out metrics of the SFT model itself (the line every later curve is compared with)."""
    return evaluate(stage1.reference, data, temperature=stage1.temperature, reference=stage1.reference)
