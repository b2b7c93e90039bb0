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


# A stack saves each operation's fixed cost, not arithmetic, so on a CPU thread its gain shrinks as the towers'
# arithmetic grows. Measured on the whole trainer (``python benchmarks/stacked.py --sweep ...``: 8 seeds of a
# 2,000-query 384-d table, one after another against stacked, each size's multiply-adds per run and step by
# arithmetic_reason's estimate; AMD EPYC, 2 cores, one thread; docs/performance.md):
#   the built-in towers (batched matmuls): 3 M (the default world) 4.6x, 27 M 2.3x, 59 M 2.1-2.2x, 95 M 1.8-2.0x,
#     134 M 1.8x, 227 M 1.5x, 336 M 1.3x;
#   a user's module (torch.vmap): 59 M 2.0x, 134 M 1.5x.
# Each limit is where the measured gain, interpolated, falls to 1.5x. Other structures of one size gain less than
# these plain towers (MLP-residual towers at 202 M: 1.2x in investigate's probe on the stdlib example), still a
# gain. (Until 2026-12-07 a single limit of 50 M stood on probes of an older, slower stacked trainer, which gained
# 1.0-1.1x at 134 M.)
CPU_STACK_MAX_MACS = 240e6  # the built-in towers' stack
CPU_VMAP_MAX_MACS = 130e6  # any other model's (torch.vmap over its own forward)
# investigate's search stacks a structure only under a stricter limit, any model: a search stack fills all its trials
# with its first trial's structure, so a costly structure takes a stack's worth of the trial cap at a discount of
# 1.2-1.8x where the one-at-a-time search would give it one trial. On doc_paraphrase (benchmarks/investigate_stacked.py,
# 2026-12-07) a flat 240 M gave 25 of 60 trials to linear-residual SFTs (151 M) and --stack auto took 197 s; at 50 M
# 2 did and it took 102 s, to the same recommendation. The search's limit is SEARCH_STACK_MAX_MACS or
# SEARCH_COST_RATIO times the cheapest structure of its space, whichever is more (within the grid's limit above): a
# stack gains about 2x at these sizes, so its trials cost about what the cheapest trial costs alone. Measured at
# that rule: the stdlib example (every structure 135-202 M; at 50 M nothing stacked) 1.24x faster than --stack off
# (282 s / 227 s), doc_paraphrase (the rule gives 55 M: its 51 M MLP-residual SFTs stack) 135 s as at 50 M (136 s),
# module_routing 3.21x, each to the same kind of recommendation.
SEARCH_STACK_MAX_MACS = 50e6
SEARCH_COST_RATIO = 2.0


def step_macs(model: nn.Module, rows: int) -> float:
    """Multiply-adds per run and step of ``model`` on ``rows`` candidates (:func:`step_rows`): rows times its
    trainable parameters, what an MLP's layers cost."""
    return float(rows * sum(p.numel() for p in model.parameters() if p.requires_grad))


def cpu_stack_limit(model: nn.Module) -> float:
    """The most multiply-adds per run and step at which a stack of ``model`` pays on a CPU, by its stack path:
    :data:`CPU_STACK_MAX_MACS` for the built-in towers, :data:`CPU_VMAP_MAX_MACS` for ``torch.vmap``."""
    return CPU_STACK_MAX_MACS if stack_reason([model]) is None else CPU_VMAP_MAX_MACS


def over_limit(macs: float, limit: float) -> str | None:
    """The note of a stack refused on a CPU for its arithmetic (None: ``macs`` is within ``limit``)."""
    if macs <= limit:
        return None
    return (
        f"about {macs / 1e6:.0f} M multiply-adds per run and step, over the {limit / 1e6:.0f} M limit here: on a CPU "
        "that is arithmetic, which a stack does not save (it saves each operation's fixed cost)"
    )


def arithmetic_reason(model: nn.Module, rows: int, device: torch.device) -> str | None:
    """Why a stack of ``model`` would not pay (None: it would, or ``device`` is not a CPU: a GPU is what a stack
    fills): on a CPU its multiply-adds per run and step (:func:`step_macs`) are over :func:`cpu_stack_limit`."""
    if torch.device(device).type != "cpu":
        return None
    return over_limit(step_macs(model, rows), cpu_stack_limit(model))


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
