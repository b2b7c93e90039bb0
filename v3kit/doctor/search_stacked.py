"""The search phase run as stacks (``v3kit investigate --stack auto``): Optuna is asked for up to
:data:`~v3kit.doctor.search.STACK_SIZE` trials at once, trials that can train together run as one stacked model
(:func:`v3kit.pipeline_stacked.run_stacked`), and each trial's result is told back when its stack ends.

How a stack is formed (ask-and-tell):

- **The enqueued variants** (the run, the remedies, the doctor's switches) are enqueued with the variants of one
  structure (:func:`signature`) next to each other (in the order each structure first appears), and asked in queue
  order: consecutive ones that share a structure form one stack (up to K), a variant alone in its structure runs
  alone.
- **A sampled trial** is asked freely (TPE), then ``K - 1`` more are enqueued with its structural parameters fixed
  (its choices and integers: epochs, switches, ``retrain_sft``), so Optuna samples only their numbers (learning
  rates, ``kl_beta``, ...): TPE would otherwise give K structures that cannot share a stack. TPE's constant liar
  spreads the K samples apart.

Pruning: each member reports its running best val score after every evaluation, at the same steps as a trial run
alone (:class:`v3kit.doctor.search.PruneOnVal`); once every live member has reported a step, the median pruner
judges each against the finished trials and the stack's other members at that step
(:class:`v3kit.doctor.pruning.StackMedianPruner`: alone, a trial competes with the trials before it; in a stack,
with its peers). A member it says stop is stopped at that epoch's end in any stage (SFT, RCE, GRPO) through
``run_stacked``'s ``prune``; one it says stop at a point the stack cannot act on (a stage's last epoch) is told
pruned all the same, as it would be alone.

The trial cap, the budget (checked before each stack, with a stack's wall time as the next unit of work), the
journal and its resume after a kill (the killed stack's trials are marked failed, the enqueued ones enqueued
again), the progress lines and the workers (local or Ray: each worker runs its own stacks) are those of the
one-at-a-time search. Every trial records ``stacked``, ``stack`` (its stack's size), ``run_s`` (its share of the
stack's wall time) and ``stack_s`` (the stack's wall time).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import RunConfig, to_dict
from ..pipeline_stacked import run_stacked
from ..provenance import flatten
from ..train import stacked_plan
from ..train.checkpoint import load_checkpoint, model_from_checkpoint
from ..train.device import resolve_device
from ..train.model import build_model
from ..train.stacked_func import choose_stack
from ..train.stacked_members import MemberPruned
from ..train.stacked_plan import cpu_stack_limit, over_limit, step_macs, step_rows
from .pruning import STACK_ATTR, StackRound
from .search import (
    Peek,
    PruneOnVal,
    Search,
    SearchTask,
    drop_checkpoints,
    import_optuna,
    name_the_journal,
    open_study,
    over_budget,
    run_trial,
    search_splits,
    trial_config,
    trial_overrides,
)
from .space import Param, fixed_point

_PER_RUN = ("run_dir", "seed")  # what every trial has of its own


def structural(params: Sequence[Param]) -> set[str]:
    """The parameters a stack's members must share: choices (switches, ``retrain_sft``) and integers (epochs)."""
    return {p.name for p in params if p.kind in ("choices", "int")}


def signature(own_sft: bool, cfg: RunConfig) -> tuple[Any, ...]:
    """What trials must share to train as one stack: whether they train their own SFT, the data, and every
    setting that is not a float (epochs, batch sizes, switches, the model's shape); floats (learning rates,
    ``kl_beta``, temperatures, ...) may differ per member.

    Stricter than what a stack needs (:func:`v3kit.stack_structure.stack_structure`, where switches may differ), on
    purpose: with the switches left free, the run, the remedies and the doctor's switch variants shared the
    search's first stacks, where no finished trial existed for the pruner to stop them against, and the searches
    took other paths. Measured (``v3kit investigate --trials 60 --top-k 2 --confirm-seeds 3 --workers 1``, as
    ``benchmarks/investigate_stacked.py`` runs it, free switches against this rule; 2026-12-07): stdlib 151 s against
    149 s; doc_paraphrase 146 s against 83 s (TPE then sent 17 trials, not 3, to the costly linear-residual SFTs);
    module_routing 81 s against 61 s; each to the same kind of recommendation."""
    flat = flatten(to_dict(cfg))
    keep = [
        (k, repr(v))
        for k, v in sorted(flat.items())
        if k not in _PER_RUN and (k.startswith("data.") or not isinstance(v, float))
    ]
    return (own_sft, tuple(keep))


class ReportOnVal(PruneOnVal):
    """:class:`PruneOnVal` for a stack member: the same reports at the same steps, but the pruner is asked once the
    stack's round of reports is in (``stack_round``; alone: at once) and its stop is kept (``pruned``) for the stack to
    act on instead of raised; nothing is reported after it."""

    pruned = False
    stack_round: StackRound | None = None

    def join(self, stack_round: StackRound) -> None:
        self.stack_round = stack_round
        stack_round.join(self)

    def on_eval(self, row: dict[str, Any]) -> None:
        if self.pruned:
            return
        if self.stack_round is None:
            self.pruned = self.observe(row)
            return
        step = self.step
        self.stack_round.before_report(step)  # (may decide that this member is pruned: then it reports no more)
        if not self.pruned and self.report(row):
            self.stack_round.reported(self, step)


@dataclass
class Member:
    trial: Any
    own_sft: bool
    cfg: RunConfig
    reporter: ReportOnVal


def _member(task: SearchTask, trial: Any) -> Member:
    own, overrides = trial_overrides(task, trial)  # samples a new trial's values
    trial.set_user_attr("overrides", overrides)
    trial.set_user_attr("own_sft", own)
    return Member(trial, own, trial_config(task, trial.number, overrides), ReportOnVal(trial, task.metric))


@dataclass(frozen=True)
class Structure:
    """What the search knows of one structure's models, probed once per search: why they cannot train as one
    batched model at all (None: they can), their multiply-adds per run and step, the grid's CPU limit for their stack
    path, and whether they train on a CPU (where the limits apply)."""

    model_reason: str | None
    macs: float
    grid_limit: float
    cpu: bool


# Per (search folder, SFT, structure): a probe builds a model (or loads the SFT checkpoint) and tries a stack of it;
# asked when a sampled trial gets its copies, when its stack runs, and for the search's limit
_PROBES: dict[tuple[str, str, tuple[Any, ...]], Structure] = {}
# per (search folder, SFT): the search's CPU limit (search_limit), from every structure of its space
_LIMITS: dict[tuple[str, str], float] = {}


def probe(task: SearchTask, own_sft: bool, cfg: RunConfig) -> Structure:
    """The :class:`Structure` of a trial's structure (whether it trains its own SFT, its config), as the stacked
    trainer would see it (:func:`v3kit.train.stacked_func.choose_stack`: the built-in towers' batched matmuls, else
    ``torch.vmap`` when its probe passes); worked out once per structure and search."""
    key = (str(task.folder), str(task.sft), signature(own_sft, cfg))
    if key not in _PROBES:
        train = search_splits(task).train
        if own_sft:
            with torch.random.fork_rng(devices=[]):  # building a model draws from torch's RNG: leave it as it was
                model = build_model(cfg.model, train.query_dim, train.cand_dim)
        else:
            model = model_from_checkpoint(load_checkpoint(task.sft), task.sft)
        with torch.random.fork_rng(devices=[]):
            _, reason = choose_stack([model, copy.deepcopy(model)], train.query_x[:2].float(), train.cand_x[:2].float())
        rows = step_rows(model, train, max(cfg.sft.batch_size, cfg.rce.batch_size, cfg.grpo.batch_size))
        cpu = resolve_device(cfg.device).type == "cpu"
        _PROBES[key] = Structure(reason, step_macs(model, rows), cpu_stack_limit(model), cpu)
    return _PROBES[key]


def search_limit(task: SearchTask) -> float:
    """The most multiply-adds per run and step at which the search stacks a structure on a CPU (and never over the
    structure's grid limit): :data:`~v3kit.train.stacked_plan.SEARCH_STACK_MAX_MACS`, or
    :data:`~v3kit.train.stacked_plan.SEARCH_COST_RATIO` times the space's cheapest structure where that is more (the
    comment there says why); the floor alone when the space has too many structures to probe."""
    key = (str(task.folder), str(task.sft))
    if key not in _LIMITS:
        structures = space_structures(task)
        floor = stacked_plan.SEARCH_STACK_MAX_MACS
        if structures is None:
            _LIMITS[key] = floor
        else:
            cheapest = min(probe(task, own, cfg).macs for own, cfg in structures)
            _LIMITS[key] = max(floor, stacked_plan.SEARCH_COST_RATIO * cheapest)
    return _LIMITS[key]


def structure_reason(task: SearchTask, own_sft: bool, cfg: RunConfig) -> str | None:
    """Why trials of this structure cannot train as one batched model (None: they can): its models refuse a stack,
    or on a CPU their arithmetic is over the search's limit (:func:`search_limit`). Such trials run alone, pruned as
    the one-at-a-time search prunes them, instead of one after another inside a stack that cannot stop them early."""
    s = probe(task, own_sft, cfg)
    if s.model_reason is not None or not s.cpu:
        return s.model_reason
    return over_limit(s.macs, min(s.grid_limit, search_limit(task)))


# How many structures space_structures builds and probes before it gives up (a space of a few model switches has
# 2-16): the search's limit is then its floor, and nothing_stacks lets the stacked search decide trial by trial
MAX_PROBED_STRUCTURES = 64


def space_structures(task: SearchTask) -> list[tuple[bool, RunConfig]] | None:
    """One (trains its own SFT, config) per structure the space can give a trial: each combination of
    ``retrain_sft``, the ``model.*`` choices and the batch-size choices (integers at their low end, the smallest
    batches and models); None when there are more than :data:`MAX_PROBED_STRUCTURES` combinations."""
    shape = [
        p
        for p in task.params
        if p.kind == "choices"
        and (p.key == "retrain_sft" or p.key.startswith("model.") or p.key.endswith("batch_size"))
    ]
    combos: list[dict[str, Any]] = [{}]
    for p in shape:
        combos = [{**c, p.name: v} for c in combos for v in p.choices]
        if len(combos) > MAX_PROBED_STRUCTURES:
            return None
    out: dict[tuple[Any, ...], tuple[bool, RunConfig]] = {}
    for fixed in combos:
        own, overrides = trial_overrides(task, Peek(fixed, {}))
        cfg = trial_config(task, 0, overrides)
        out.setdefault(signature(own, cfg), (own, cfg))
    return list(out.values())


def nothing_stacks(task: SearchTask) -> str | None:
    """Why no trial of this search could train in a stack (None: some could): every structure the space can give a
    trial (:func:`space_structures`) is one :func:`structure_reason` refuses. ``--stack auto`` then runs the
    one-at-a-time search itself: the stacked search would run every trial alone anyway, but along another path (its
    enqueue order, TPE's constant liar), which on the stdlib example took longer to the same decision."""
    structures = space_structures(task)
    if structures is None:
        return None
    reasons = []
    for own, cfg in structures:
        reasons.append(structure_reason(task, own, cfg))
        if reasons[-1] is None:
            return None
    return f"no trial's model can train in a stack ({len(reasons)} structures; e.g. {reasons[0]})"


def _finished(study: Any) -> int:
    """Trials that count towards the cap (as Optuna's MaxTrialsCallback counts them), running ones too."""
    import optuna

    S = optuna.trial.TrialState
    return len(study.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED, S.FAIL, S.RUNNING)))


def ask_stack(study: Any, task: SearchTask, n: int) -> list[Member]:
    """Up to ``n`` trials that share a structure (see the module docstring): the longest run of waiting trials
    with the first one's structure, or a sampled trial and ``n - 1`` trials that sample only its numbers."""
    import optuna

    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    if waiting:
        count, first = 0, None
        for frozen in waiting[:n]:
            own, overrides = trial_overrides(task, Peek.waiting(frozen))
            sig = signature(own, trial_config(task, frozen.number, overrides))
            if first is not None and sig != first:
                break
            first, count = sig, count + 1
        return [_member(task, study.ask()) for _ in range(count)]
    lead = _member(task, study.ask())
    names = structural(task.params)
    fixed = {k: v for k, v in lead.trial.params.items() if k in names}
    if len(fixed) == len(lead.trial.params):  # nothing numeric was sampled: copies would be the same trial
        return [lead]
    if (
        structure_reason(task, lead.own_sft, lead.cfg) is not None
    ):  # copies would run alone: TPE samples the next trials freely
        return [lead]
    for _ in range(n - 1):
        study.enqueue_trial(fixed, user_attrs={"stack_of": lead.trial.number})
    return [lead, *(_member(task, study.ask()) for _ in range(n - 1))]


def _tell(study: Any, task: SearchTask, m: Member, outcome: float | BaseException, attrs: dict[str, Any]) -> None:
    """Tell Optuna how member ``m`` ended: complete with its shipped model's val score, pruned, or failed."""
    import optuna

    S = optuna.trial.TrialState
    for k, v in attrs.items():
        m.trial.set_user_attr(k, v)
    drop_checkpoints(Path(m.cfg.run_dir))
    if isinstance(outcome, (MemberPruned, optuna.TrialPruned)) or m.reporter.pruned:
        frozen = study.tell(m.trial, state=S.PRUNED)
    elif isinstance(outcome, BaseException):
        optuna.logging.get_logger("optuna").warning(
            f"Trial {m.trial.number} failed: {type(outcome).__name__}: {outcome}"
        )
        frozen = study.tell(m.trial, state=S.FAIL)
    else:
        frozen = study.tell(m.trial, outcome)
    if task.progress:
        value = "" if frozen.value is None else f" val {task.metric} {frozen.value:.4f}"
        name = frozen.user_attrs.get("name", f"trial{frozen.number}")
        where = f" [stack of {attrs['stack']}]" if attrs.get("stacked") else ""
        print(f"search: trial {frozen.number} ({name}) {frozen.state.name.lower()}{value}{where}", flush=True)


def _alone(task: SearchTask, m: Member) -> tuple[float | BaseException, float]:
    """(outcome, run seconds) of a trial run as the one-at-a-time search runs it (pruned by raising)."""
    try:
        outcome: float | BaseException = run_trial(task, m.trial)
    except Exception as e:  # as study.optimize(catch=(Exception,)): the trial fails (or is pruned), the search goes on
        outcome = e
    return outcome, float(m.trial.user_attrs.get("run_s", 0.0))


def run_stack(study: Any, task: SearchTask, members: list[Member]) -> None:
    """Train ``members`` (one structure) as one stacked model and tell each trial its result; a lone member runs
    as the one-at-a-time search runs it."""
    reason = structure_reason(task, members[0].own_sft, members[0].cfg) if len(members) > 1 else None
    if len(members) == 1 or reason is not None:
        if reason is not None and task.progress:
            numbers = ", ".join(str(m.trial.number) for m in members)
            print(f"search: trials {numbers} run one at a time: {reason}", flush=True)
        for m in members:
            outcome, run_s = _alone(task, m)
            attrs = {"stacked": False, "stack": 1, "run_s": run_s, "stack_s": run_s}
            _tell(study, task, m, outcome, attrs if reason is None else {**attrs, "stack_note": reason})
        return
    stack_round = StackRound()
    for m in members:  # the pruner counts the members of one stack as each other's competitors
        m.trial.set_user_attr(STACK_ATTR, members[0].trial.number)
        m.reporter.join(stack_round)
    t0 = time.perf_counter()
    try:
        out = run_stacked(
            [m.cfg for m in members],
            sft_checkpoint=None if members[0].own_sft else task.sft,
            splits=search_splits(task),
            prune=lambda k, epoch, metrics: _judged(stack_round, members[k]),
            callbacks=[[m.reporter] for m in members],
            prune_stages=("sft", "rce", "grpo"),
        )
        results, stacked = list(out.results), out.stacked
    except Exception as e:  # the whole stack failed (a full disk, a bad config): each of its trials failed
        results, stacked = [e] * len(members), False
    stack_round.settle()  # a last round some member left open (it skipped the step or stopped)
    wall = time.perf_counter() - t0
    attrs = {"stacked": stacked, "stack": len(members), "run_s": wall / len(members), "stack_s": wall}
    for m, res in zip(members, results):
        outcome: float | BaseException = res if isinstance(res, BaseException) else _shipped(m, res)
        _tell(study, task, m, outcome, attrs)


def _judged(stack_round: StackRound, m: Member) -> bool:
    """Whether the stack should stop ``m`` now (asked at an epoch's end): a round still waiting is decided first,
    with the reports in. In lockstep every live member has reported by then (a no-op), unless one skipped the
    step (a non-finite val score)."""
    stack_round.settle()
    return m.reporter.pruned


def _shipped(m: Member, res: Any) -> float:
    """The val score of the model a member's run ships (its selection), recorded as a trial run alone records it."""
    assert res.selection is not None
    m.trial.set_user_attr("selected", f"{res.selection.stage}:{res.selection.epoch}")
    return float(res.selection.val)


def optimize_stacked(task: SearchTask) -> int:
    """One worker's search as stacks until the trial cap, the budget or the deadline; returns its trials."""
    import_optuna()
    study = open_study(task.folder, task.metric, seed=task.seed + task.index, constant_liar=True)
    ran = 0
    while True:
        n = min(task.stack_size, task.max_trials - _finished(study))
        if n <= 0 or time.time() >= task.deadline or over_budget(study, task, unit="stack_s"):
            return ran
        members = ask_stack(study, task, n)
        groups: dict[tuple[Any, ...], list[Member]] = {}
        for m in members:  # one group, unless another worker took a queued trial between the look and the ask
            groups.setdefault(signature(m.own_sft, m.cfg), []).append(m)
        for group in groups.values():
            run_stack(study, task, group)
        ran += len(members)


def stacked_worker(task: SearchTask) -> int:
    """One worker of the stacked search (see :func:`optimize_stacked`)."""
    return name_the_journal(task, optimize_stacked)


class StackedSearch(Search):
    """:class:`~v3kit.doctor.search.Search` whose workers run their trials as stacks (``--stack auto``)."""

    worker = staticmethod(stacked_worker)

    def enqueue(self, variants: Sequence[tuple[str, Sequence[str]]]) -> int:
        """:meth:`Search.enqueue`, the variants of one structure next to each other (stable), so that they are
        asked one after another and share a stack."""
        task = self.task()
        groups: dict[tuple[Any, ...], list[tuple[str, Sequence[str]]]] = {}
        for name, overrides in variants:
            values, extra = fixed_point(self.params, list(overrides), self.base)
            peek = Peek(values, {"extra": extra})
            own, full = trial_overrides(task, peek)
            groups.setdefault(signature(own, trial_config(task, 0, full)), []).append((name, overrides))
        return super().enqueue([v for group in groups.values() for v in group])
