"""Whether K runs' stages train as one stack, and as which: the checks that send them one after another
(:func:`sequential_reason`: different schedules, devices or data; :func:`arithmetic_reason`: on a CPU, arithmetic a
stack does not save) and the choice of stacked model (:func:`model_stack`). :mod:`v3kit.train.stacked` trains the
stack."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..data.contract import GroupData
from ..data.shared_candidates import pays
from . import distributed
from .stacked_flat import FlatStack
from .stacked_func import choose_stack
from .stacked_towers import stack_reason
from .training import RunContext, Stage


def sequential_reason(stages: Sequence[Stage], runs: Sequence[RunContext]) -> str | None:
    """Why these members cannot train as one stack (None: they can)."""
    if len(stages) < 2:
        return "a single run"
    if distributed.current().world > 1:
        return "several processes (torchrun) split each run's batch instead"
    first, run0 = stages[0], runs[0]
    for s, r in zip(stages, runs):
        if type(s) is not type(first) or s.cfg.epochs != first.cfg.epochs or s.cfg.batch_size != first.cfg.batch_size:
            return "the members differ in stage, epochs or batch size"
        if len(s.train) != len(first.train) or s.train.group_size != first.train.group_size:
            return "the members train on data of different sizes"
        if (torch.device(r.device), r.precision, r.log_every) != (
            torch.device(run0.device),
            run0.precision,
            run0.log_every,
        ):
            return "the members differ in device, precision or log_every"
        if s.cfg.on_nonfinite != first.cfg.on_nonfinite:
            return "the members differ in on_nonfinite"
    return None


# A stack saves each operation's fixed cost (about 1.5 ms a step on a CPU thread), not arithmetic. Modelling a
# member's step as that cost plus its own arithmetic, 8 members gain at least 1.5x while the arithmetic stays under
# about 2 ms a step: about 50 million multiply-adds at a CPU thread's 25 GMAC/s of small matmuls. Measured
# (benchmarks/stacked.py, benchmarks/investigate_stacked.py) with the estimate of arithmetic_reason: the default
# world (3 M a step) stacks 3-3.5x, 384-d 64-32 towers (27 M) 2.3x, the stdlib example's 384-d 256-128 towers
# (134 M) 1.0-1.1x, and slower than alone through vmap.
CPU_STACK_MAX_MACS = 50e6


def arithmetic_reason(model: nn.Module, rows: int, device: torch.device) -> str | None:
    """Why a stack of ``model`` would not pay (None: it would, or ``device`` is not a CPU: a GPU is what a stack
    fills): on a CPU its multiply-adds per run and step, ``rows`` (a batch's candidates) times its trainable
    parameters (what an MLP's layers cost), are over :data:`CPU_STACK_MAX_MACS`."""
    if torch.device(device).type != "cpu":
        return None
    macs = rows * sum(p.numel() for p in model.parameters() if p.requires_grad)
    if macs <= CPU_STACK_MAX_MACS:
        return None
    return (
        f"about {macs / 1e6:.0f} M multiply-adds per run and step: on a CPU that is arithmetic, which a stack does "
        f"not save (it saves each operation's fixed cost; stacks pay below {CPU_STACK_MAX_MACS / 1e6:.0f} M)"
    )


def step_rows(model: nn.Module, data: GroupData, batch_size: int) -> int:
    """The rows :func:`arithmetic_reason` charges a step of ``model`` on ``data``: a batch's candidates, B x G;
    when the built-in towers' stack embeds the candidates as a shared table, scaled by the share of the towers'
    rows left (a query tower of B rows and a candidate tower of U, instead of B and B x G)."""
    rows = batch_size * data.group_size
    table = data.cand_table
    if table is None or stack_reason([model]) is not None or not pays(len(table.features), rows):
        return rows
    return max(1, round(rows * (batch_size + len(table.features)) / (batch_size + rows)))


def model_stack(stages: Sequence[Stage], device: torch.device) -> tuple[FlatStack | None, str | None]:
    """The stacked model of the stages' models (on ``device``), or None and why it cannot be built
    (:func:`~v3kit.train.stacked_func.choose_stack`, probed on the first training groups) or would not pay
    (:func:`arithmetic_reason`)."""
    for s in stages:
        s.model.to(device)
    data = stages[0].train
    reason = arithmetic_reason(stages[0].model, step_rows(stages[0].model, data, stages[0].cfg.batch_size), device)
    if reason is not None:
        return None, reason
    return choose_stack(
        [s.model for s in stages], data.query_x[:2].float().to(device), data.cand_x[:2].float().to(device)
    )
