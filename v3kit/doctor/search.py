"""The search phase of ``v3kit investigate``: an Optuna study over the declared search space (:mod:`.space`).

Each trial trains one seed from the run's SFT (or a new SFT, when it samples ``retrain_sft`` or the model's head)
and is scored on the **val** split only: a trial's pipeline gets the run's train and val splits, and val in the
test slot, so the test split never enters a trial (the confirm phase, :mod:`.confirm`, is the first to read it).
Every epoch's val metric feeds Optuna's pruner (the running best, because every trial ships its best val epoch).

The study lives in a journal file in the output folder (``search/study.journal``): a killed search resumes
without redoing finished trials, and workers on several machines (``--backend ray`` on a shared filesystem) share
one study. Workers are :mod:`v3kit.ablate.backends` tasks, each running ``study.optimize`` until the trial cap or
the budget (which keeps room for the confirm phase, estimated from the trials' measured run times) says stop.
This module runs one trial at a time (``--stack off``); :mod:`.search_stacked` runs them as stacks.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import pipeline
from ..ablate.backends import make_backend, worker_config
from ..ablate.worker import splits_for
from ..config import ConfigError, RunConfig, load_config, parse_override, to_dict
from ..data.contract import Splits
from ..provenance import flatten
from ..rundir import UNKNOWN_FILE, DiskFullError, as_disk_full, free_bytes
from ..train.metrics import METRIC_DIRECTION
from .pruning import StackMedianPruner
from .space import Param, fixed_point, run_values, suggest, to_overrides

STUDY = "investigate"
JOURNAL = "study.journal"
TRIAL_SEED = 0  # every trial trains with one seed; the confirm phase retrains the finalists with fresh ones
OPTUNA_INSTALL = "pip install -e '.[search]'"
STACK_SIZE = 8  # trials asked of Optuna at once when the search runs as stacks (--stack auto)
ALIASES = "aliases"  # the study's user attribute: {variant: the variant whose trial it shares} (Search.enqueue)


def import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError(f"v3kit investigate's search needs Optuna: {OPTUNA_INSTALL}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_study(folder: Path, metric: str, seed: int = 0, constant_liar: bool = False) -> Any:
    """The study in ``folder/study.journal`` (created on first use): TPE seeded with ``seed``, and a median
    pruner that waits for 5 finished trials and never stops a trial before its third val evaluation (a stack's
    members also count each other: :class:`~v3kit.doctor.pruning.StackMedianPruner`).
    ``constant_liar``: TPE counts running trials as bad ones, so trials asked together spread out (a stack)."""
    optuna = import_optuna()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    folder.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(folder / JOURNAL)))
    return optuna.create_study(
        study_name=STUDY,
        storage=storage,
        direction="maximize" if METRIC_DIRECTION[metric] > 0 else "minimize",
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=10, constant_liar=constant_liar),
        pruner=StackMedianPruner(n_startup_trials=5, n_warmup_steps=2),
        load_if_exists=True,
    )


class PruneOnVal:
    """Training callback: reports the running best val ``metric`` after every evaluation (every stage's epoch 0
    included) and stops the trial when Optuna's pruner says so."""

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial, self.metric, self.step, self.best = trial, metric, 0, math.nan
        self.d = METRIC_DIRECTION[metric]

    def report(self, row: dict[str, Any]) -> bool:
        """Report ``row``'s running best at the next step, when it is a val row with a finite metric (whether it
        was)."""
        v = row.get(self.metric)
        if row.get("split") != "val" or v is None or not math.isfinite(float(v)):
            return False
        if math.isnan(self.best) or self.d * (float(v) - self.best) > 0:
            self.best = float(v)
        self.trial.report(self.best, self.step)
        self.step += 1
        return True

    def observe(self, row: dict[str, Any]) -> bool:
        """:meth:`report` ``row``; whether the pruner then says stop."""
        return self.report(row) and bool(self.trial.should_prune())

    def on_eval(self, row: dict[str, Any]) -> None:
        if self.observe(row):
            import optuna

            raise optuna.TrialPruned(f"val {self.metric} {self.best:.4f} below the median at step {self.step}")


@dataclass
class ConfirmPlan:
    top_k: int  # finalists
    seeds: int  # fresh seeds each
    own_sft: bool  # the run's SFT is retrained per seed too (the run trained it)


@dataclass
class SearchTask:
    """What one search worker needs (picklable: it travels to a spawned process or a Ray node)."""

    index: int
    folder: Path
    cfg: RunConfig  # the split's config (its seed fixes the split); the backends read cfg.device
    params: list[Param]
    base: list[str]  # the run's overrides and data.split_seed
    sft: str  # the run's SFT checkpoint
    metric: str
    deadline: float  # time.time() by which search and confirm must be done
    plan: ConfirmPlan  # the confirm phase the search leaves time for
    workers: int
    max_trials: int
    seed: int = 0
    base_values: dict[str, Any] = field(default_factory=dict)
    progress: bool = False  # one line per finished trial
    stack_size: int = STACK_SIZE  # trials per stack (read by the stacked search only)


class Peek:
    """An enqueued trial (or a variant about to be) seen through the suggest API, to read what it trains before
    asking for it: a fixed value where the queue fixed one, else the range's low end (floats do not change a
    structure)."""

    def __init__(self, fixed: dict[str, Any], user_attrs: dict[str, Any]) -> None:
        self.fixed, self.user_attrs = dict(fixed), dict(user_attrs)

    @classmethod
    def waiting(cls, frozen: Any) -> Peek:
        return cls(frozen.system_attrs.get("fixed_params", {}), frozen.user_attrs)

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        return self.fixed.get(name, choices[0])

    def suggest_int(self, name: str, low: int, high: int, **_: Any) -> int:
        return self.fixed.get(name, low)

    def suggest_float(self, name: str, low: float, high: float, **_: Any) -> float:
        return self.fixed.get(name, low)


def trial_overrides(task: SearchTask, trial: Any) -> tuple[bool, list[str]]:
    """(trains its own SFT, every override) of ``trial``: the sampled values, then what the space cannot express
    of an enqueued variant (``user_attrs['extra']``), then ``select=best_val`` on the verdict's metric."""
    with warnings.catch_warnings():  # an enqueued variant's value may lie outside a range: it is meant to
        warnings.filterwarnings("ignore", message=".*out of range.*")
        values = suggest(trial, task.params, task.base_values)
    retrain, sampled = to_overrides(task.params, values)
    extra = list(trial.user_attrs.get("extra", []))
    own = retrain or any(o.startswith(("sft.", "model.")) for o in extra)
    return own, [*sampled, *extra, "select=best_val", f"select_metric={task.metric}"]


def trial_config(task: SearchTask, number: int, overrides: Sequence[str]) -> RunConfig:
    """The config trial ``number`` trains: the run's, ``overrides``, one seed, its own run dir."""
    run_dir = task.folder / f"trial{number}"
    cfg = load_config(None, [*task.base, *overrides, f"seed={TRIAL_SEED}", f"run_dir={run_dir}", "progress=false"])
    return worker_config(cfg)


def search_splits(task: SearchTask) -> Splits:
    """The run's train and val splits, val in the test slot: the test split never enters a trial."""
    splits = splits_for(task.cfg)
    return Splits(train=splits.train, val=splits.val, test=splits.val)


def drop_checkpoints(run_dir: Path) -> None:
    for p in run_dir.glob("*.pt"):  # a trial is a number: its checkpoints are not needed again
        p.unlink()


def run_trial(task: SearchTask, trial: Any) -> float:
    """Train ``trial``'s config with one seed on train, score it on val (its shipped model's val metric)."""
    own, overrides = trial_overrides(task, trial)
    trial.set_user_attr("overrides", overrides)
    trial.set_user_attr("own_sft", own)
    cfg = trial_config(task, trial.number, overrides)
    t0 = time.perf_counter()
    try:
        res = pipeline.run_pipeline(
            cfg,
            sft_checkpoint=None if own else task.sft,
            splits=search_splits(task),
            callbacks=[PruneOnVal(trial, task.metric)],
        )
    finally:
        trial.set_user_attr("run_s", time.perf_counter() - t0)
        drop_checkpoints(Path(cfg.run_dir))
    assert res.selection is not None
    trial.set_user_attr("selected", f"{res.selection.stage}:{res.selection.epoch}")
    return float(res.selection.val)


def confirm_seconds(trials: Sequence[dict[str, Any]], metric: str, plan: ConfirmPlan, workers: int) -> float:
    """Seconds the confirm phase will take, from the trials' measured run times (``trials``: dicts with ``name``,
    ``state``, ``value``, ``run_s``): the current top ``plan.top_k`` trials each at its own time, the run at the
    run trial's time (twice when the run's SFT is retrained too: an SFT per seed), times the seeds, over the
    workers, plus a 20% margin for the per-seed SFTs and the scoring of the test split. A trial that ran in a stack
    (``stack_s``: the stack's wall time, ``run_s`` its share) counts at least ``stack_s / seeds``: the confirm
    phase stacks a finalist's seeds, and a stack of ``seeds`` runs takes no longer than the trial's stack."""
    d = METRIC_DIRECTION[metric]
    done = [t for t in trials if t["state"] == "complete" and t["value"] is not None]
    if not done:
        return 0.0
    done.sort(key=lambda t: -d * t["value"])

    def cost(t: dict[str, Any]) -> float:
        return max(float(t["run_s"]), float(t.get("stack_s", t["run_s"])) / max(1, plan.seeds))

    times = sorted(cost(t) for t in done)
    median = times[len(times) // 2]
    run = next((cost(t) for t in done if t["name"] == "run"), median)
    per_seed = sum(cost(t) for t in done[: plan.top_k]) + run * (2 if plan.own_sft else 1)
    return 1.2 * per_seed * plan.seeds / max(1, workers)


def _trial_rows(study: Any) -> list[dict[str, Any]]:
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return [
        {
            "name": t.user_attrs.get("name"),
            "state": "complete",
            "value": t.value,
            "run_s": t.user_attrs.get("run_s", 0.0),
            "stack_s": t.user_attrs.get("stack_s", t.user_attrs.get("run_s", 0.0)),
        }
        for t in done
    ]


def over_budget(study: Any, task: SearchTask, unit: str = "run_s") -> bool:
    """Whether one more unit of work (the median finished trial's ``unit``: ``run_s`` a trial, ``stack_s`` a
    stack) and the confirm phase would end past the deadline."""
    rows = _trial_rows(study)
    times = sorted(r[unit] for r in rows)
    per = times[len(times) // 2] if times else 0.0
    return time.time() + per + confirm_seconds(rows, task.metric, task.plan, task.workers) > task.deadline


def search_worker(task: SearchTask) -> int:
    """One worker: ``study.optimize`` until the trial cap, the budget, or the study's end; returns its trials."""
    return name_the_journal(task, _optimize)


def name_the_journal(task: SearchTask, optimize: Callable[[SearchTask], int]) -> int:
    """``optimize(task)``, with a full disk while Optuna writes the journal named as the journal."""
    try:
        return optimize(task)
    except Exception as e:  # Optuna's journal writes name no file (and may wrap the OSError): name the journal
        full = as_disk_full(e)
        if full is None or full.filename != UNKNOWN_FILE:
            raise
        raise DiskFullError(task.folder / JOURNAL, free=free_bytes(task.folder)) from e


def _optimize(task: SearchTask) -> int:
    optuna = import_optuna()
    study = open_study(task.folder, task.metric, seed=task.seed + task.index)
    ran = 0

    def budget(study: Any, trial: Any) -> None:
        nonlocal ran
        ran += 1
        if task.progress:
            value = "" if trial.value is None else f" val {task.metric} {trial.value:.4f}"
            name = trial.user_attrs.get("name", f"trial{trial.number}")
            print(f"search: trial {trial.number} ({name}) {trial.state.name.lower()}{value}", flush=True)
        if over_budget(study, task):
            study.stop()

    S = optuna.trial.TrialState
    cap = optuna.study.MaxTrialsCallback(task.max_trials, states=(S.COMPLETE, S.PRUNED, S.FAIL))
    timeout = task.deadline - time.time()
    if timeout > 0:
        study.optimize(
            lambda t: run_trial(task, t), timeout=timeout, callbacks=[cap, budget], catch=(Exception,), n_jobs=1
        )
    return ran


@dataclass
class SearchResult:
    trials: list[dict[str, Any]]  # every finished trial: number, name, state, value, overrides, own_sft, run_s,
    # stacked (and stack: how many trials its stack held)
    counts: dict[str, int]  # complete, pruned, failed, running (stale), waiting
    wall_s: float
    study: Any = None
    aliases: dict[str, str] = field(default_factory=dict)  # variant -> the variant whose trial it shares


class Search:
    """The driver: opens the study, enqueues the doctor's variants first, runs the workers, reads the result.
    Its workers run one trial at a time (:class:`v3kit.doctor.search_stacked.StackedSearch` runs stacks)."""

    worker: Callable[[SearchTask], int] = staticmethod(search_worker)

    def __init__(
        self,
        folder: Path,
        params: Sequence[Param],
        *,
        base: Sequence[str],
        split_cfg: RunConfig,
        sft: Path,
        metric: str,
        workers: int = 1,
        backend: str = "local",
        address: str | None = None,
        max_trials: int = 200,
        seed: int = 0,
    ) -> None:
        self.folder, self.params, self.base, self.split_cfg = Path(folder), list(params), list(base), split_cfg
        self.sft, self.metric, self.workers, self.backend, self.address = str(sft), metric, workers, backend, address
        self.max_trials, self.seed = max_trials, seed
        self.study = open_study(self.folder, metric, seed)

    def enqueue(self, variants: Sequence[tuple[str, Sequence[str]]]) -> int:
        """Enqueue each named variant (the run, the remedies, the doctor's switches) once per study: they are the
        first trials, and they rank the search without gating it. A variant that trains the config of one before it
        (the remedy ``residual_pipeline`` and the doctor's switch to a residual head, on a run with the default
        head) is not trained again: it is recorded as that variant's alias (the study's ``aliases``, read back as
        :attr:`SearchResult.aliases`) and shares its trial. Returns how many were new."""
        task = self.task()
        trials = self.study.get_trials(deepcopy=False)
        aliases: dict[str, str] = dict(self.study.user_attrs.get(ALIASES, {}))
        names = {t.user_attrs.get("name") for t in trials} | set(aliases)
        seen: dict[Any, str] = {}
        for t in trials:
            if "name" in t.user_attrs:
                fixed = t.params or t.system_attrs.get("fixed_params", {})
                seen.setdefault(variant_key(task, fixed, t.user_attrs.get("extra", [])), t.user_attrs["name"])
        new = 0
        for name, overrides in variants:
            if name in names:
                continue
            names.add(name)
            values, extra = fixed_point(self.params, list(overrides), self.base)
            key = variant_key(task, values, extra)
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
            self.study.enqueue_trial(values, user_attrs={"name": name, "extra": extra})
            new += 1
        if aliases:
            self.study.set_user_attr(ALIASES, aliases)
        return new

    def _fail_stale(self) -> int:
        """Trials a killed search left RUNNING are marked failed (one driver per study) and, when they were
        enqueued variants, enqueued again."""
        import optuna

        stale = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        for t in stale:
            self.study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            if "name" in t.user_attrs:
                attrs = {k: t.user_attrs[k] for k in ("name", "extra") if k in t.user_attrs}
                self.study.enqueue_trial(t.params, user_attrs=attrs)
        return len(stale)

    def task(self, deadline: float = 0.0, plan: ConfirmPlan | None = None, progress: bool = False) -> SearchTask:
        """What each worker gets (its ``index`` set per worker); with the defaults, a task to read trials'
        configurations with (no deadline, no confirm plan)."""
        return SearchTask(
            0,
            self.folder,
            self.split_cfg,
            self.params,
            list(self.base),
            self.sft,
            self.metric,
            deadline,
            plan or ConfirmPlan(0, 0, False),
            self.workers,
            self.max_trials,
            self.seed,
            run_values(self.base),
            progress,
        )

    def run(self, deadline: float, plan: ConfirmPlan | None = None, progress: bool = False) -> SearchResult:
        t0 = time.perf_counter()
        self._fail_stale()
        task = self.task(deadline, plan, progress)
        tasks = [dataclasses.replace(task, index=k) for k in range(self.workers)]
        errors: list[str] = []
        runner = make_backend(
            self.backend, workers=self.workers, out_dir=self.folder, address=self.address, device=self.split_cfg.device
        )
        try:
            runner.run(self.worker, tasks, lambda t: f"search worker {t.index}", lambda: None, errors)
        finally:
            runner.close()
        if errors:
            raise RuntimeError("the search failed:\n" + "\n".join(errors))
        return self.result(time.perf_counter() - t0)

    def result(self, wall_s: float = 0.0) -> SearchResult:
        import optuna

        S = optuna.trial.TrialState
        trials = self.study.get_trials(deepcopy=False)
        counts = {
            "complete": sum(t.state == S.COMPLETE for t in trials),
            "pruned": sum(t.state == S.PRUNED for t in trials),
            "failed": sum(t.state == S.FAIL for t in trials),
            "waiting": sum(t.state == S.WAITING for t in trials),
        }
        rows = [
            {
                "number": t.number,
                "name": t.user_attrs.get("name", f"trial{t.number}"),
                "state": t.state.name.lower(),
                "value": t.value,
                "best": t.value if t.value is not None else _best_intermediate(t),
                "overrides": list(t.user_attrs.get("overrides", [])),
                "own_sft": bool(t.user_attrs.get("own_sft", False)),
                "run_s": float(t.user_attrs.get("run_s", math.nan)),
                "selected": t.user_attrs.get("selected"),
                "stacked": bool(t.user_attrs.get("stacked", False)),  # trained in a stack of several trials
                "stack": int(t.user_attrs.get("stack", 1)),
            }
            for t in trials
            if t.state != S.WAITING
        ]
        return SearchResult(rows, counts, wall_s, self.study, dict(self.study.user_attrs.get(ALIASES, {})))


def _best_intermediate(trial: Any) -> float | None:
    """A pruned trial's last report: its running best val score when it was stopped."""
    steps = trial.intermediate_values
    return float(steps[max(steps)]) if steps else None


def config_key(overrides: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """The config ``overrides`` train, as the config loader resolves them (values typed, the last value of a key
    wins; the trials' shared base left out): two override lists that train the same config have one key, whatever
    their order, spelling or repeats (an enqueued variant repeats ``select=best_val``)."""
    try:
        flat = flatten(to_dict(load_config(None, overrides)))
    except ConfigError:  # not a config on its own: compare what the overrides say
        flat = {".".join(keys): value for keys, value in map(parse_override, overrides)}
    return tuple(sorted((k, repr(v)) for k, v in flat.items()))


def variant_key(task: SearchTask, values: dict[str, Any], extra: Sequence[str]) -> tuple[bool, Any]:
    """What an enqueued variant (its parameter values and extra overrides) trains: whether it trains its own SFT,
    and the config its overrides resolve to (:func:`config_key`), as its trial would run it."""
    own, overrides = trial_overrides(task, Peek(values, {"extra": list(extra)}))
    return own, config_key(overrides)


def finalists(result: SearchResult, metric: str, k: int) -> list[dict[str, Any]]:
    """The ``k`` best complete trials on val with distinct configurations (the first of equal ones)."""
    d = METRIC_DIRECTION[metric]
    done = [t for t in result.trials if t["state"] == "complete" and t["value"] is not None]
    done.sort(key=lambda t: (-d * t["value"], t["number"]))
    out, seen = [], set()
    for t in done:
        key = (t["own_sft"], config_key(t["overrides"]))
        if key in seen:
            continue
        seen.add(key)
        out.append(t)
        if len(out) == k:
            break
    return out
