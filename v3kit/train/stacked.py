"""Many runs of one stage trained as one model: :func:`fit_stacked` is :func:`v3kit.train.training.fit` for K
members that share an architecture and a schedule (the same stage, epochs, batch size and data size) and differ
in seed (initialisation, batch order, sampling), numeric hyperparameters (lr, max_grad_norm, and every number a
stage's ``step`` reads from its own config: ``kl_beta``, the clip range, ``label_weight``, the RCE temperatures,
``sim_temperature``, ``entropy_coef``, ...) and switches (``samples``, ``kl_estimator``, ``old_policy``, their own
training rewards, ...).

How a stacked step works: every member draws its batch from its own generator exactly as its sequential run would
(so batch order and GRPO's sampling match), the K batches are gathered at once, one batched forward pass
(:class:`~v3kit.train.stacked_towers.StackedTowers`) scores them all, and the objectives turn each member's slice of
the scores into its loss (its own old policy, reference log-probs, annealed temperature, adaptive KL): one stacked
objective per switch setting the members share (:mod:`v3kit.train.stacked_losses`), and a member's own
``Stage.step`` where no stacked objective covers its switches. One backward pass of the summed losses gives every
member its own gradient (the members share no weight), which is clipped per member; one Adam step over the stack
updates them all. Per member, everything else is the sequential code: evaluations, ``metrics.csv``, epoch
checkpoints (the same files a sequential run writes, resumable by either), non-finite handling and callbacks. A
member that fails (a non-finite step with ``on_nonfinite: stop``) or that ``prune`` stops is masked out; the others
go on.

This module holds the lockstep loop; each member's own state and bookkeeping (its evaluations, rows, checkpoints
and result) are :class:`~v3kit.train.stacked_members.Member`'s.

The built-in towers stack as batched matmuls (:class:`~v3kit.train.stacked_towers.StackedTowers`); any other model
(a user's module, a scorer, an imported model) through ``torch.func.vmap``
(:class:`~v3kit.train.stacked_func.StackedFunc`) when a probe on a tiny batch shows that vmap runs it as its
members run it. A stack that cannot be batched (a model vmap cannot handle, several processes under torchrun) runs
its members one after another through ``fit`` instead, with a one-line note saying why; nothing fails for that.
"""

from __future__ import annotations

import contextlib
import gc
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.contract import Batch, GroupData, num_batches, take_rows
from ..data.shared_candidates import SharedCandidates, pays
from .checkpoint import epoch_checkpoints
from .device import autocast
from .metrics import member_ranking_metrics
from .metrics_log import call_callbacks
from .model import INTERFACE_ATTR, Interface
from .optim import check_on_nonfinite, check_optim_fields, nonfinite_error
from .stacked_flat import FlatStack
from .stacked_losses import Ref, member_log_probs, objective_key, stacked_loss
from .stacked_members import Member, MemberPruned
from .stacked_plan import (  # noqa: F401 - arithmetic_reason, step_rows, CPU_STACK_MAX_MACS: also here, as before
    CPU_STACK_MAX_MACS,
    arithmetic_reason,
    model_stack,
    sequential_reason,
    step_rows,
)
from .stacked_towers import StackedTowers
from .training import RunContext, Stage, StageResult, StepContext, fit, kill_point

# Member-groups per stacked evaluation pass (a pass of K members takes EVAL_ROWS // K groups): a pass the size of
# one member's training batches stays in cache; 1,024 groups for each of 8 members made every GELU and matmul of the
# pass a trip to memory, and the evaluation 1.5x slower (measured on the default world).
EVAL_ROWS = 512
RESTACK_FRACTION = 0.75  # restack once at most this share of the stack's members is still training
EPOCH_GATHER_BYTES = 16 * 2**20  # up to this much training data is gathered once an epoch in the members' orders
# prune(member index, epoch, held-out metrics of that epoch) -> True to stop training that member from here on
PruneFn = Callable[[int, int, dict[str, float]], bool]


@dataclass
class StackOutcome:
    """What :func:`fit_stacked` did: one entry per member (a :class:`StageResult`, or the exception that stopped
    it), whether the members ran as one stack, and if not, why."""

    results: list[StageResult | BaseException]
    stacked: bool
    note: str = ""


class _Scores(nn.Module):
    """Stands in for a member's model inside its ``Stage.step``: returns that member's slice of the stacked scores,
    so the step's own code (temperature, loss, statistics) runs unchanged on them."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("_device", torch.empty(0, device=device), persistent=False)
        object.__setattr__(self, INTERFACE_ATTR, Interface("scorer"))
        self.current: Tensor | None = None

    def forward(self, query_x: Tensor, cand_x: Tensor) -> Tensor:  # noqa: ARG002 - the scores are precomputed
        assert self.current is not None
        return self.current


def fit_stacked(stages: Sequence[Stage], runs: Sequence[RunContext], *, prune: PruneFn | None = None) -> StackOutcome:
    """Train every ``stages[k]`` under ``runs[k]`` as :func:`fit` would, as one stacked model when they allow it
    (:func:`sequential_reason`), else one after another. Each member's outcome is its :class:`StageResult` or the
    exception its run raised (a non-finite step, :class:`MemberPruned`); the others are not affected."""
    if len(stages) != len(runs) or not stages:
        raise ValueError(f"fit_stacked needs one RunContext per stage, got {len(stages)} stages and {len(runs)}")
    reason, tower = sequential_reason(stages, runs), None
    if reason is None:
        tower, reason = model_stack(stages, torch.device(runs[0].device))
    if reason is not None:
        results: list[StageResult | BaseException] = []
        for s, r in zip(stages, runs):
            try:
                results.append(fit(s, r))
            except Exception as e:  # one member's failure is its own, as in separate runs
                results.append(e)
        return StackOutcome(results, stacked=False, note=f"ran one after another: {reason}")
    return StackOutcome(_StackedFit(stages, runs, prune, tower).run(), stacked=True)


@contextlib.contextmanager
def _long_lived_frozen() -> Any:
    """Python's collector leaves alone the objects alive when a stacked stage starts (the data, the modules, the
    earlier stages' ``metrics.csv`` rows): K members' rows and statistics made the collector's full pass over them
    run during the stage (about 0.15 s, 3% of 8 stacked runs of the default world); one run alone does not reach it.
    Garbage among them is collected after the stage. Left as is when the caller has frozen objects itself."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class _StackedFit:
    """The state and loop of one stacked stage (see the module docstring)."""

    fast = True  # the stacked objectives (False: every step through the members' own Stage.step)

    def __init__(
        self, stages: Sequence[Stage], runs: Sequence[RunContext], prune: PruneFn | None, tower: FlatStack
    ) -> None:
        first = stages[0]
        self.name, self.cfg0, self.prune = first.name, first.cfg, prune
        for s in stages:
            check_optim_fields(s.name, s.cfg.epochs, s.cfg.lr, s.cfg.batch_size, s.cfg.max_grad_norm)
            check_on_nonfinite(s.name, s.cfg.on_nonfinite)
        if runs[0].log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {runs[0].log_every}")
        self.device = torch.device(runs[0].device)
        self.precision, self.log_every = runs[0].precision, runs[0].log_every
        self.members = [Member.start(s, r, self.device) for s, r in zip(stages, runs)]
        self.tower: Any = tower
        self.rows = list(range(len(stages)))  # the member each row of the stack trains (_restack drops stopped ones)
        self.proxy = _Scores(self.device)
        self.steps_per_epoch = num_batches(len(first.train), first.cfg.batch_size)
        self.total_steps = self.steps_per_epoch * first.cfg.epochs
        self.max_norms = torch.tensor(
            [math.inf if s.cfg.max_grad_norm is None else s.cfg.max_grad_norm for s in stages], device=self.device
        )
        self.ref_logps: dict[tuple[int, int, float], Tensor] = {}
        self.shared_train = all(s.train is first.train for s in stages)
        # the distinct candidates when they recur across groups (v3kit.data.shared_candidates; the built-in towers'
        # stack): every member's candidate tower then embeds them once a step, as its run alone does
        table = first.train.cand_table
        use_table = table is not None and self.shared_train and isinstance(tower, StackedTowers)
        slots = first.cfg.batch_size * first.train.group_size
        self.table = table.features.float().to(self.device) if use_table and pays(len(table.features), slots) else None
        # no padding in any member's training groups: the stacked objectives then skip every mask operation
        self.full = all(bool(s.train.mask.all()) for s in stages)
        self.check_each_step = self.device.type == "cpu" or first.cfg.on_nonfinite == "skip_batch"
        self._total: Tensor | None = None
        self._epoch_parts: tuple[Tensor | None, ...] | None = None
        self.lrs = [s.cfg.lr for s in stages]
        self.weight_decays = [getattr(s.cfg, "weight_decay", 0.0) for s in stages]
        self.cache: dict[str, Any] = {}  # the stacked objectives' per-stage constants (stacked_losses.StackCache)
        # One thread writes the epoch checkpoints, in order, while the next epoch trains; a write's error (a full
        # disk) surfaces at the next epoch end or at the stage's end.
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="v3kit-checkpoints")
        self.writes: list[Future[None]] = []

    # ------------------------------------------------------------------ resume
    def _restore(self) -> tuple[int, int]:
        """Every member from the newest epoch checkpoint all of them have (the stack moves in lockstep: a kill
        between two members' checkpoints of one epoch resumes all from the epoch before); (epoch, step)."""
        found = []
        for m in self.members:
            existing = epoch_checkpoints(m.run_dir, self.name) if m.run_dir is not None else []
            if not m.run.resume:
                for _, path in existing:  # a fresh start owns the stage's checkpoints, as in fit
                    path.unlink()
                existing = []
            found.append({e: p for e, p in existing if e <= m.stage.cfg.epochs})
        common = set.intersection(*(set(f) for f in found))
        epoch = max(common) if common else 0
        step = 0
        for m, done in zip(self.members, found):
            if epoch == 0:
                m.log.start_stage(self.name, [])
                continue
            step = m.load(self.name, done[epoch])
            m.checkpoints = [p for e, p in sorted(done.items()) if e <= epoch]
        self.tower.from_members([m.stage.model for m in self.members])
        for k, m in enumerate(self.members):
            self.tower.load_adam_state(
                k, [m.optimizer.state[p] for p in m.stage.model.parameters() if p in m.optimizer.state]
            )
        return epoch, step

    # ------------------------------------------------------------------ the stacked evaluation
    @torch.inference_mode()
    def _val_metrics(self) -> dict[int, dict[str, float]]:
        """Each active member's held-out metrics (``evaluate()``'s, to float32 rounding) from one stacked forward
        pass per chunk of groups and one pass of the metrics over all members; empty when the members evaluate
        different data (each member then evaluates its own model)."""
        live, pos = self._live()
        val = self.members[live[0]].stage.val if live else None
        if val is None or any(self.members[k].stage.val is not val for k in live):
            return {}
        refs = [self.members[k].ref_log_probs(self.precision, self.ref_logps) for k in live]
        if len({r is None for r in refs}) > 1:
            return {}
        temps = [self.members[k].stage.eval_temperature() for k in live]
        chunks: list[Tensor] = []
        with autocast(self.device, self.precision):
            chunk = max(1, EVAL_ROWS // self.tower.k)
            for start in range(0, len(val), chunk):
                rows = slice(start, start + chunk)
                q, mask, k = val.query_x[rows].float(), val.mask[rows], self.tower.k
                shared = None
                if self.table is not None and val.cand_table is not None:
                    shared = val.cand_table.batch(torch.arange(len(val))[rows])
                if shared is None:
                    c = val.cand_x[rows].float()
                    scores = self.tower.scores(q.expand(k, *q.shape), c.expand(k, *c.shape))
                else:
                    table, c = shared.features.to(self.device), shared.rows.to(self.device)
                    scores = self.tower.scores(q.expand(k, *q.shape), c.expand(k, *c.shape), table)
                scores = scores if len(pos) == k else scores[pos]
                chunks.append(member_log_probs(scores, temps, mask.expand(len(live), *mask.shape)).float())
        logp = torch.cat(chunks, dim=1)
        ref = None if refs[0] is None else torch.stack(refs)  # type: ignore[arg-type]
        metrics = member_ranking_metrics(logp, val.labels, val.rewards, val.mask, utility=val.utility, ref_logp=ref)
        return dict(zip(live, metrics))

    # ------------------------------------------------------------------ one step
    def _batches(self, start: int) -> Tensor:
        """Every stacked member's next batch rows (rows ``start ..`` of its epoch order, ``[K, B]``), gathered at once
        into ``self._parts``. A stopped member still in the stack has its rows gathered too (the stack's shapes stay
        [K, ...]); nothing reads them."""
        size = self.cfg0.batch_size
        idx = self._orders[:, start : start + size]
        if self._epoch_parts is not None:  # the epoch's data in each member's order: a batch is a slice of it
            parts = tuple(None if p is None else p[:, start : start + size] for p in self._epoch_parts)
        elif self.shared_train:
            parts = self._shared_rows(idx)
        else:
            cols = [self._gather(self.members[k].stage.train, i) for k, i in zip(self.rows, idx)]
            parts = tuple(None if c[0] is None else torch.stack(c) for c in zip(*cols))  # type: ignore[assignment]
        self._parts = parts
        return idx

    def _batch(self, j: int, idx: Tensor) -> Batch:
        """The batch of the stack's row ``j`` as its member's own ``Stage.step`` takes it (the objectives that are
        not stacked)."""
        q, c, mask, labels, rewards, util = (None if p is None else p[j] for p in self._parts)
        if self.table is not None:  # c: the slots' rows of the table
            c = SharedCandidates(self.table, c).dense()
        return Batch(idx[j], q, c, mask, labels, rewards, util)  # type: ignore[arg-type]

    def _live(self) -> tuple[list[int], list[int]]:
        """The active members and their rows in the stack."""
        pos = [j for j, k in enumerate(self.rows) if self.members[k].active]
        return [self.rows[j] for j in pos], pos

    def _shared_rows(self, idx: Tensor) -> tuple[Tensor | None, ...]:
        """Rows ``idx`` (``[K, ...]``) of the members' shared training data, one gather per field."""
        data = self.members[0].stage.train
        c = take_rows(data.cand_x, idx) if self.table is None else data.cand_table.rows[idx]  # type: ignore[union-attr]
        parts = (take_rows(data.query_x, idx), c, data.mask[idx], data.labels[idx])
        return (*parts, data.rewards[idx], None if data.utility is None else data.utility[idx])

    @staticmethod
    def _gather(data: GroupData, i: Tensor) -> tuple[Any, ...]:
        util = None if data.utility is None else data.utility[i]
        q, c = take_rows(data.query_x, i), take_rows(data.cand_x, i)
        return q, c, data.mask[i], data.labels[i], data.rewards[i], util

    def _losses(
        self, idx: Tensor, live: list[int], pos: list[int], ctxs: list[StepContext]
    ) -> tuple[Tensor, list[bool], list[dict[str, Any]]]:
        """The active members' (``live``, in the stack's rows ``pos``) losses ``[L]`` (detached), whether each has a
        gradient, and their statistics; ``self._total`` is the sum to differentiate. The members whose switches
        share an objective (:func:`~v3kit.train.stacked_losses.objective_key`) get one stacked objective per
        key over their rows of the scores (all of them, in the common case of one key); any other member gets its
        own ``Stage.step`` on its slice of the scores."""
        q, c, mask, labels, rewards, _ = self._parts
        scores = self.tower.scores(q, c) if self.table is None else self.tower.scores(q, c, self.table)
        stack_idx = idx
        if len(pos) < self.tower.k:  # the stopped members' rows out of the objective (their gradient stays 0)
            scores, mask, labels, rewards = (t[pos] for t in (scores, mask, labels, rewards))
            idx = idx[pos]
        stages = [self.members[k].stage for k in live]
        live_ctxs = [ctxs[k] for k in live]
        groups, alone, back = self._objectives(live, stages)
        if len(groups) == 1 and not alone:  # one objective for the whole stack: no slicing
            b = {"index": idx, "mask": mask, "labels": labels, "rewards": rewards, "full": self.full}
            fast = stacked_loss(stages, b, scores, live_ctxs, self.cache)
            assert fast is not None
            self._total = fast[0].sum()
            return fast[0].detach(), [True] * len(live), fast[1]
        parts: list[Tensor] = []  # each group's losses, then each member's own (the order `back` undoes)
        stats: list[dict[str, Any]] = [{} for _ in live]
        requires = [True] * len(live)
        for key, js, rows in groups:
            b = {"index": idx[rows], "mask": mask[rows], "labels": labels[rows], "rewards": rewards[rows]}
            b["full"] = self.full
            own_cache = self.cache.setdefault(("objective", key, tuple(js)), {})
            sub = [stages[j] for j in js]
            fast = stacked_loss(sub, b, scores[rows], [live_ctxs[j] for j in js], own_cache)
            assert fast is not None
            parts.append(fast[0])
            for j, st in zip(js, fast[1]):
                stats[j] = st
        own_losses = []
        for j in alone:
            m = self.members[live[j]]
            self.proxy.current = scores[j]
            own, m.stage.model = m.stage.model, self.proxy
            try:
                loss, st = m.stage.step(self._batch(pos[j], stack_idx), live_ctxs[j])
            finally:
                m.stage.model = own
            own_losses.append(loss.reshape(()))
            requires[j] = own_losses[-1].requires_grad
            stats[j] = st
        self.proxy.current = None
        if own_losses:
            parts.append(torch.stack(own_losses))
        every = torch.cat(parts) if len(parts) > 1 else parts[0]
        graded = [p.sum() for p in parts[: len(groups)]] + [x for x in own_losses if x.requires_grad]
        self._total = torch.stack(graded).sum() if graded else None
        return every.detach()[back], requires, stats

    def _objectives(
        self, live: list[int], stages: list[Stage]
    ) -> tuple[list[tuple[Any, list[int], Tensor]], list[int], Tensor]:
        """The live members (positions in ``live``) grouped by :func:`objective_key` (each group: its key, its
        positions and their index tensor), those left to their own ``Stage.step`` (every member when :attr:`fast`
        is off), and the permutation from the groups' order (then the others') back to the members'; the same for
        every step of a stage, so kept."""
        key = ("objectives", tuple(live))
        if key not in self.cache:
            by_key: dict[Any, list[int]] = {}
            alone: list[int] = []
            for j, stage in enumerate(stages):
                ok = objective_key(stage) if self.fast else None
                if ok is None:
                    alone.append(j)
                else:
                    by_key.setdefault(ok, []).append(j)
            groups = [(k, js, torch.tensor(js, device=self.device)) for k, js in by_key.items()]
            order = [j for js in by_key.values() for j in js] + alone
            back = torch.empty(len(order), dtype=torch.long)
            back[torch.tensor(order)] = torch.arange(len(order))
            self.cache[key] = (groups, alone, back.to(self.device))
        return self.cache[key]

    def _step(self, epoch: int, step: int, start: int) -> None:
        idx = self._batches(start)
        live, pos = self._live()
        ctxs = [StepContext(epoch, step, self.total_steps, m.generator) for m in self.members]
        with autocast(self.device, self.precision):
            losses, requires, stats = self._losses(idx, live, pos, ctxs)
        self.tower.zero_grad()
        if self._total is not None:
            self._total.backward()
        self._total = None
        norms = self.tower.clip(self.max_norms)
        bad = self._nonfinite(pos, losses, norms)
        frozen = [True] * len(self.rows)
        for j in range(len(live)):
            frozen[pos[j]] = not requires[j] or bad[j] is not None
        self.tower.adam_step(self.lrs, frozen, self.weight_decays)
        for j, k in enumerate(live):
            m, st = self.members[k], stats[j]
            if bad[j] is not None and m.stage.cfg.on_nonfinite == "stop":  # fit raises here: this member stops
                m.error = nonfinite_error(self.name, bad[j], epoch, step + 1, m.checkpoints, m.run_dir)
                continue
            if m.stage.cfg.on_nonfinite == "skip_batch":
                st = {**st, "skipped_nonfinite": int(bad[j] is not None)}
            norm = Ref(norms, pos[j]) if requires[j] else 0.0
            row = {"stage": self.name, "split": "train", "epoch": epoch, "step": step + 1, "loss": Ref(losses, j)}
            m.pending.append({**row, **st, "grad_norm": norm, "lr": m.optimizer.param_groups[0]["lr"]})

    def _nonfinite(self, pos: list[int], losses: Tensor, norms: Tensor) -> list[str | None]:
        """Per active member (``pos``: their rows in the stack): what was non-finite this step (None: nothing); one
        host read for the whole stack."""
        bad: list[str | None] = [None] * len(pos)
        if not self.check_each_step or not pos:
            return bad
        if bool(torch.isfinite(losses.float().sum() + norms.float().sum())):  # the common case in 3 operations
            return bad
        ok_loss = torch.isfinite(losses.float())  # (a finite sum can also overflow: then the exact check decides)
        ok = ok_loss & torch.isfinite(norms[pos].float())
        if not bool(ok.all()):
            for j, flag in enumerate(ok.tolist()):
                if not flag:
                    bad[j] = "loss" if not bool(ok_loss[j]) else "gradient"
        return bad

    # ------------------------------------------------------------------ the loop
    def run(self) -> list[StageResult | BaseException]:
        try:
            with _long_lived_frozen():
                out = self._run()
        except BaseException:  # a kill of the whole stack (Ctrl-C, a full disk): release every metrics.csv
            self.writer.shutdown(wait=True, cancel_futures=True)
            for m in self.members:
                m.log.close()
            raise
        self.writer.shutdown(wait=True)
        return out

    def _wait_for_writes(self) -> None:
        writes, self.writes = self.writes, []
        for w in writes:
            w.result()

    def _run(self) -> list[StageResult | BaseException]:
        start_epoch, step = self._restore()
        cfg = self.cfg0
        for m in self.members:
            info = {"epochs": cfg.epochs, "steps_per_epoch": self.steps_per_epoch, "resumed_from_epoch": start_epoch}
            call_callbacks(m.run.callbacks, "on_stage_start", self.name, self.total_steps, info)
        metrics = self._val_metrics() if start_epoch == 0 else {}
        for k, m in enumerate(self.members):
            if start_epoch == 0:
                m.evaluate(self.name, 0, 0, self.precision, self.ref_logps, metrics.get(k))
        show = any(m.run.progress for m in self.members)
        bar = tqdm(
            total=self.total_steps,
            initial=step,
            desc=f"{self.name} x{len(self.members)}",
            disable=not show,
            leave=False,
        )
        n = len(self.members[0].stage.train)
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            self._start_epoch(epoch, n)
            for start in range(0, n, cfg.batch_size):
                if not any(m.active for m in self.members):
                    break
                self._step(epoch, step, start)
                step += 1
                kill_point(f"{self.name}:epoch{epoch}:step{step}")
                self._after_step(bar)
            self._end_epoch(epoch, step)
        bar.close()
        self._wait_for_writes()
        return self._results(start_epoch)

    def _start_epoch(self, epoch: int, n: int) -> None:
        # (the members' modules already hold the stack's weights: the stack was built from them or the last
        # epoch's end copied them out)
        stacked = [self.members[k] for k in self.rows]
        for m in stacked:
            if not m.active:
                m.order = None
                continue
            m.stage.on_epoch_start(epoch)
            m.stage.model.train()
            m.order = torch.randperm(n, generator=m.generator)
        # every stacked member's order of the epoch in one tensor: a step's K batches are then one slice of it
        self._orders = torch.stack([torch.arange(n) if m.order is None else m.order for m in stacked])
        # Small shared data is gathered once an epoch in every member's order (each batch is then a view of it):
        # at the default world's size that is 6 gathers an epoch instead of 6 a step.
        data = self.members[0].stage.train
        # a group's bytes: features are gathered as float32, the candidate table's rows are int64
        row_bytes = sum(t[:1].numel() * 4 for t in (data.query_x, data.rewards))
        row_bytes += data.cand_x[:1].numel() * 4 if self.table is None else data.cand_table.rows[:1].numel() * 8
        small = self.shared_train and len(self.rows) * n * row_bytes <= EPOCH_GATHER_BYTES
        self._epoch_parts = self._shared_rows(self._orders) if small else None

    def _after_step(self, bar: Any) -> None:
        bar.update(1)
        read: dict[int, list[float]] = {}
        for m in self.members:
            if m.active and len(m.pending) >= self.log_every:
                m.flush(self.name, self.check_each_step, read)

    def _end_epoch(self, epoch: int, step: int) -> None:
        read: dict[int, list[float]] = {}
        for m in self.members:
            if m.active:
                m.flush(self.name, self.check_each_step, read)
        self.tower.to_members([self.members[k].stage.model for k in self.rows])
        # the trainable weights of every row in one check (frozen ones do not change)
        finite = torch.isfinite(self.tower.data).all(dim=1).tolist()
        for j, k in enumerate(self.rows):
            m = self.members[k]
            if m.active and not finite[j]:
                m.error = nonfinite_error(self.name, "weights", epoch, step, m.checkpoints, m.run_dir)
        metrics = self._val_metrics()
        self._wait_for_writes()
        live, pos = self._live()
        snapshot = self.tower.adam_snapshot()
        for k, j in zip(live, pos):
            m = self.members[k]
            m.evaluate(self.name, epoch, step, self.precision, self.ref_logps, metrics.get(k))
            if m.run_dir is not None:
                payload = m.payload(self.name, epoch, step)
                path, commit = m.checkpoint_path(self.name, epoch)
                adam = partial(self.tower.adam_state, j, snapshot)
                self.writes.append(self.writer.submit(m.write, self.name, epoch, path, payload, adam, commit))
        for k, m in enumerate(self.members):
            if m.active and self.prune is not None and epoch < self.cfg0.epochs and self.prune(k, epoch, m.metrics):
                m.error = MemberPruned(f"{self.name}: pruned after epoch {epoch}")
        self._restack()

    def _restack(self) -> None:
        """Go on without the stopped members once a quarter of the stack has stopped (a search prunes about half
        of its trials early): a new stack of the members still active, each with its weights (the members' own
        modules hold them at an epoch's end), Adam state and step count, so their steps stop paying for the rows
        of the stopped ones."""
        live, pos = self._live()
        if not live or len(live) > RESTACK_FRACTION * len(self.rows):
            return
        states = [(self.tower.adam_state(j), self.tower.steps[j]) for j in pos]
        tower = type(self.tower)([self.members[k].stage.model for k in live])
        for i, (state, steps) in enumerate(states):
            tower.load_adam_state(i, state)
            tower.steps[i] = steps
        self.tower, self.rows = tower, live
        self.max_norms = self.max_norms[pos]
        self.lrs = [self.lrs[j] for j in pos]
        self.weight_decays = [self.weight_decays[j] for j in pos]
        self.cache.clear()

    def _results(self, start_epoch: int) -> list[StageResult | BaseException]:
        info = {"epochs": self.cfg0.epochs, "steps_per_epoch": self.steps_per_epoch, "resumed_from_epoch": start_epoch}
        return [m.result(self.name, dict(info)) for m in self.members]
