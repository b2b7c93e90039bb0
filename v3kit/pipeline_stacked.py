"""Many pipeline runs in one: :func:`run_stacked` does what :func:`v3kit.pipeline.run_pipeline` does for each of K
configs, with every stage of the K runs trained in lockstep as one stacked model (:mod:`v3kit.train.stacked`):
SFT, stage 1, RCE, GRPO. Each run writes the run directory its sequential run writes (``config.yaml``,
``metrics.csv``, checkpoints, ``summary.csv``, ``selection.json``), so the doctor, the statistics and the verdict
read it unchanged.

The K runs must share their data (the same ``data`` section and split seed, or ``splits`` given). They may differ
in ``seed`` and in any number a stage reads; runs whose structure differs in a way one stack cannot hold (epochs,
batch size, a model ``torch.vmap`` cannot run) are trained one after another by the same code, with a note saying
why.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from . import trackers
from .config import RunConfig, dump_config, to_dict
from .data.contract import Splits
from .pipeline import (
    PipelineResult,
    check_before_writing,
    check_resumable,
    check_same_sft,
    record_config,
    record_sft_checkpoint,
    run_pipeline,
    ship,
    split_seed,
    update_run_info,
)
from .run import Run, grpo_temperature, prepare_data, sft_select_metric
from .rundir import RunLock
from .train.checkpoint import (
    check_finite_checkpoint,
    checkpoint_model_config,
    load_checkpoint,
    model_payload,
    save_checkpoint,
)
from .train.grpo import GRPOStage
from .train.model import build_model
from .train.rce import RCEStage
from .train.selection import BestVal
from .train.sft import SFTStage, Stage1, keep_best_epoch, load_sft
from .train.stacked import PruneFn, fit_stacked
from .train.stacked_members import MemberPruned
from .train.training import RunContext, StageResult


@dataclass
class StackedRuns:
    """One entry per config: its :class:`PipelineResult` or the exception that stopped it; whether its stages
    ran stacked, and the notes of any stage that ran one run after another."""

    results: list[PipelineResult | BaseException]
    stacked: bool
    notes: list[str] = field(default_factory=list)


def share_data_reason(cfgs: Sequence[RunConfig]) -> str | None:
    """Why these runs cannot share one dataset (None: they can)."""
    first = to_dict(cfgs[0])["data"]
    for c in cfgs[1:]:
        if to_dict(c)["data"] != first or split_seed(c) != split_seed(cfgs[0]):
            return "the runs differ in data or split seed"
    return None


def run_stacked(
    cfgs: Sequence[RunConfig],
    *,
    sft_checkpoint: str | Path | Sequence[str | Path] | None = None,
    splits: Splits | None = None,
    resume: bool = False,
    tracking: Sequence[Mapping[str, Any] | None] | None = None,
    prune: PruneFn | None = None,
    callbacks: Sequence[Sequence[Any]] | None = None,
    prune_stages: Sequence[str] = ("grpo",),
) -> StackedRuns:
    """Run every config of ``cfgs`` as :func:`run_pipeline` would (its own ``run_dir``), stacked; see the module
    docstring. ``sft_checkpoint``: the SFT checkpoint every run starts from, or one per config (the per-seed SFTs of
    a grid's variant: each run keeps its own frozen reference and old log-probs; their models must be alike to
    stack). ``tracking``: per config, what ``run_pipeline``'s ``tracking`` is. ``prune``: see
    :func:`v3kit.train.stacked.fit_stacked`, asked after every epoch but the last of the stages in ``prune_stages``
    (a member pruned before GRPO trains no later stage: its run ends there). ``callbacks``: per config, what
    ``run_pipeline``'s ``callbacks`` are (a search's reporter of val scores)."""
    cfgs = list(cfgs)
    tracking = list(tracking) if tracking is not None else [None] * len(cfgs)
    callbacks = [list(c) for c in callbacks] if callbacks is not None else [[] for _ in cfgs]
    # given splits are the caller's word that the runs share them (a grid's runs: one split per world)
    reason = "a single run" if len(cfgs) < 2 else None if splits is not None else share_data_reason(cfgs)
    sfts = _per_run(sft_checkpoint, len(cfgs))
    if reason is not None:
        out: list[PipelineResult | BaseException] = []
        for c, t, cb, sft in zip(cfgs, tracking, callbacks, sfts):
            try:
                out.append(run_pipeline(c, sft_checkpoint=sft, splits=splits, resume=resume, tracking=t, callbacks=cb))
            except Exception as e:
                out.append(e)
        return StackedRuns(out, stacked=False, notes=[f"ran one after another: {reason}"])
    if sfts[0] is None and cfgs[0].sft.checkpoint:
        sfts = [cfgs[0].sft.checkpoint] * len(cfgs)
    if sfts[0] is not None:
        model_cfgs: dict[str, Any] = {}
        for path in dict.fromkeys(str(p) for p in sfts):
            ckpt = load_checkpoint(path)
            check_finite_checkpoint(ckpt, path)
            model_cfgs[path] = checkpoint_model_config(ckpt, path)
        cfgs = [dataclasses.replace(c, model=model_cfgs[str(p)]) for c, p in zip(cfgs, sfts)]
    with contextlib.ExitStack() as stack:
        reporters = []
        for c, t in zip(cfgs, tracking):
            Path(c.run_dir).mkdir(parents=True, exist_ok=True)
            stack.enter_context(RunLock(Path(c.run_dir)))
            reporters.append(stack.enter_context(trackers.reporting(c, c.run_dir, resume=resume, tracking=t)))
        runs = _Stack(cfgs, reporters, sfts, splits, resume, callbacks, tuple(prune_stages))
        return runs.run(prune)


def _per_run(sft_checkpoint: str | Path | Sequence[str | Path] | None, n: int) -> list[str | Path | None]:
    """``run_stacked``'s ``sft_checkpoint`` as one entry per run (None, or an empty path as ``run_pipeline`` reads
    it: each run trains its own SFT)."""
    if sft_checkpoint is None or isinstance(sft_checkpoint, (str, Path)):
        return [sft_checkpoint or None] * n
    sfts = list(sft_checkpoint)
    if len(sfts) != n or any(p is None for p in sfts):
        raise ValueError(f"run_stacked needs one SFT checkpoint per config, got {len(sfts)} for {n} configs")
    return sfts


class _NoReporter:
    def callbacks(self) -> list[Any]:
        return []


def train_sft_stacked(cfgs: Sequence[RunConfig], splits: Splits) -> StackedRuns:
    """Train each config's SFT (``sft.pt`` in its ``run_dir``, with its ``metrics.csv``) as one stacked model, as
    :meth:`v3kit.run.Run.sft` trains it alone: the SFT checkpoints a grid (or ``investigate``'s confirm phase)
    needs per seed or per finalist. One entry per config: the path of its ``sft.pt`` or the exception that stopped
    it. The configs share ``splits``."""
    cfgs = list(cfgs)
    stack = _Stack(cfgs, [_NoReporter() for _ in cfgs], [None] * len(cfgs), splits, False, [[] for _ in cfgs], ())
    paths = stack.train_sft()
    results: list[Any] = [stack.errors.get(k, paths[k]) for k in range(len(cfgs))]
    return StackedRuns(results, stacked=stack.stacked, notes=stack.notes)


class _Stack:
    """The K runs of :func:`run_stacked`, stage by stage (one :class:`v3kit.run.Run` each, sharing the splits); a
    run that fails drops out of the later stages."""

    def __init__(
        self,
        cfgs: list[RunConfig],
        reporters: list[Any],
        sfts: list[str | Path | None],  # per run: the SFT checkpoint it starts from (None: it trains its own)
        splits: Splits | None,
        resume: bool,
        callbacks: list[list[Any]],
        prune_stages: tuple[str, ...] = ("grpo",),
    ):
        self.cfgs, self.reporters, self.sfts, self.resume = cfgs, reporters, sfts, resume
        self.given = sfts[0] is not None  # every run starts from a given checkpoint, or every run trains its own
        self.prune_stages = prune_stages
        self.errors: dict[int, BaseException] = {}
        self.notes: list[str] = []
        self.stacked = True
        self.recorded = {}
        if resume:
            for k, c in enumerate(cfgs):
                check_resumable(c, c.run_dir)
                self.recorded[k] = check_same_sft(Path(c.run_dir), sfts[k])
        self.splits = splits or prepare_data(cfgs[0])
        self.runs = [
            Run(c, splits=self.splits, callbacks=[*cb, *r.callbacks()], resume=resume, warn=k == 0)
            for k, (c, r, cb) in enumerate(zip(cfgs, reporters, callbacks))
        ]
        for run in self.runs:
            check_before_writing(run)  # a missing device, a model too big, data that cannot support the config
        self.runtime = self.runs[0].runtime
        self.runs[0].use_threads()

    def live(self) -> list[int]:
        return [k for k in range(len(self.cfgs)) if k not in self.errors]

    def context(self, k: int) -> RunContext:
        return RunContext(**self.runs[k].context())

    def fit(
        self, ks: list[int], stages: list[Any], prune: PruneFn | None = None, contexts: list[RunContext] | None = None
    ) -> dict[int, StageResult]:
        if not ks:  # every run stopped in an earlier stage (failed or pruned)
            return {}
        off = prune is None or stages[0].name not in self.prune_stages
        member_prune = None if off else (lambda j, epoch, m: prune(ks[j], epoch, m))
        outcome = fit_stacked(stages, contexts or [self.context(k) for k in ks], prune=member_prune)
        if len(ks) > 1:  # one member left (the others pruned or failed) is not a fall-back: the stack stood till then
            self.stacked = self.stacked and outcome.stacked
            if outcome.note:
                self.notes.append(f"{stages[0].name}: {outcome.note}")
        done = {}
        for k, r in zip(ks, outcome.results):
            if isinstance(r, BaseException):
                self.errors[k] = r
            elif r.info.get("pruned") and stages[0].name != "grpo":  # pruned before the last stage: its run ends
                self.errors[k] = MemberPruned(f"{stages[0].name}: pruned")
            else:
                done[k] = r
        return done

    def run(self, prune: PruneFn | None) -> StackedRuns:
        for c in self.cfgs:
            dump_config(c, Path(c.run_dir) / "config.yaml")
        sft_paths = self.train_sft(prune)
        for k in self.live():
            record_sft_checkpoint(
                Path(self.cfgs[k].run_dir), sft_paths[k], given=self.given, recorded=self.recorded.get(k)
            )
            record_config(Path(self.cfgs[k].run_dir), self.cfgs[k])
        stage1 = self.stage1(sft_paths)
        rl, self.debias = {}, {}
        for k in self.live():
            rl[k], debias = self.runs[k].training_splits, self.runs[k].debias
            self.debias[k] = debias
            if debias is not None:
                update_run_info(Path(self.cfgs[k].run_dir), **debias.as_dict())
        ks = self.live()
        stages = [
            RCEStage(stage1[k].policy, rl[k], self.cfgs[k].rce, stage1[k].model_config, reference=stage1[k].reference)
            for k in ks
        ]
        rce = self.fit(ks, stages, prune=prune)
        after_rce = {k: copy.deepcopy(stage1[k].policy) for k in rce}
        grpo, temps = self.grpo(stage1, rl, prune)
        results: list[PipelineResult | BaseException] = []
        for k in range(len(self.cfgs)):
            if k in self.errors:
                results.append(self.errors[k])
                continue
            try:
                results.append(self.finish(k, stage1[k], rce[k], after_rce[k], grpo[k]))
            except Exception as e:
                results.append(e)
        return StackedRuns(results, stacked=self.stacked, notes=self.notes)

    def train_sft(self, prune: PruneFn | None = None) -> dict[int, Path]:
        """Each run's ``sft.pt``: the given checkpoint, a finished one (on resume), or trained here, stacked, as
        :func:`v3kit.train.sft.train_sft` trains it (under ``select: best_val`` its best val epoch ships)."""
        if self.given:
            return {k: Path(str(p)) for k, p in enumerate(self.sfts)}
        paths = {k: Path(c.run_dir) / "sft.pt" for k, c in enumerate(self.cfgs)}
        todo = [k for k in paths if not (self.resume and paths[k].exists())]
        dims = (self.splits.train.query_dim, self.splits.train.cand_dim)
        stages, metas, trackers_, inits, contexts = [], [], [], [], []
        for k in todo:
            c = self.cfgs[k]
            torch.manual_seed(c.seed)  # as train_sft: the initialisation comes from the run's seed
            model = build_model(c.model, *dims)
            meta = {"config": asdict(c.sft), **model_payload(c.model, *dims)}
            stage = SFTStage(
                model, self.splits.train, self.splits.val, c.sft, temperature=c.model.sim_temperature, meta=meta
            )
            context, tracker, init = self.context(k), None, {}
            metric = sft_select_metric(c)
            if metric is not None:  # the callback keeps the best epoch's weights, as in train_sft
                init = {name: t.detach().clone() for name, t in model.state_dict().items()}
                tracker = BestVal(model, "sft", metric)
                context = dataclasses.replace(context, callbacks=[*context.callbacks, tracker])
            stages.append(stage)
            metas.append(meta)
            trackers_.append(tracker)
            inits.append(init)
            contexts.append(context)
        if todo:
            done = self.fit(todo, stages, prune=prune, contexts=contexts)
            for k, stage, meta, tracker, init in zip(todo, stages, metas, trackers_, inits):
                if k not in done:
                    continue
                epoch = self.cfgs[k].sft.epochs
                if tracker is not None:
                    metric = sft_select_metric(self.cfgs[k])
                    epoch = keep_best_epoch(stage.model, done[k], tracker, init, self.cfgs[k].run_dir, metric)
                payload = {"stage": "sft", "epoch": epoch, "step": -1, "model": stage.model.state_dict(), **meta}
                save_checkpoint(paths[k], payload)
        return paths

    def stage1(self, paths: dict[int, Path]) -> dict[int, Stage1]:
        """Stage 1 per run; runs that start from one checkpoint share its frozen reference and old log-probs (both
        read-only), each with its own trainable copy of the policy."""
        on = dict(device=self.runtime.device, precision=self.runtime.precision)
        loaded: dict[Path, Stage1] = {}
        out = {}
        for k in self.live():
            p = paths[k]
            if p not in loaded:
                loaded[p] = load_sft(p, self.splits.train, **on)
                out[k] = loaded[p]
            else:
                base = loaded[p]
                out[k] = dataclasses.replace(base, policy=copy.deepcopy(base.reference).requires_grad_(True).train())
        return out

    def grpo(self, stage1: dict[int, Stage1], rl: dict[int, Splits], prune: PruneFn | None) -> tuple[dict, dict]:
        ks = self.live()
        temps, stages = {}, []
        for k in ks:
            c, s1 = self.cfgs[k], stage1[k]
            temps[k] = grpo_temperature(c, s1.model_config)
            if c.grpo.kl_reference == "sft" and s1.reference is None:
                raise ValueError("grpo.kl_reference='sft' needs the frozen SFT model")
            stages.append(
                GRPOStage(
                    s1.policy,
                    rl[k],
                    s1.old_log_probs,
                    c.grpo,
                    s1.model_config,
                    reference=s1.reference,
                    temperature=temps[k],
                    device=self.runtime.device,
                    precision=self.runtime.precision,
                )
            )
        done = self.fit(ks, stages, prune=prune)
        for k, stage in zip(ks, stages):
            if k in done:
                done[k].info.update(step0_ratios=stage.step0_ratios, temperature=temps[k], **stage.step0_summary)
        return done, temps

    def finish(self, k: int, s1: Stage1, rce: StageResult, after_rce: Any, grpo: StageResult) -> PipelineResult:
        """The run's selection, stage table and files, as :func:`v3kit.pipeline.run_pipeline` writes them."""
        result = ship(self.runs[k], s1, rce, after_rce, grpo)
        self.reporters[k].finish(result.table, result.run_dir)
        return result
