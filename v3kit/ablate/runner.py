"""Running a grid: one SFT per world, every (variant, seed) run from it, resumable, in parallel workers."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import yaml
from tqdm.auto import tqdm

from .. import trackers
from ..config import RunConfig, to_dict
from ..provenance import experiment_config, fingerprint
from ..rundir import atomic_write_frame, atomic_write_text
from .backends import make_backend
from .grid import (
    BASE_WORLD,
    BEST,
    METRIC_DIRECTION,
    GridError,
    GridSpec,
    load_grid,
)
from .stats import summarize
from .tasks import RunTask, SFTPlan, SFTTask, plan_sft_stacks, plan_stacks
from .worker import (  # noqa: F401 - per_query_outcomes, splits_for: their old path (v3kit.ablate.runner)
    execute_run,
    execute_stack,
    per_query_outcomes,
    splits_for,
    train_sft,
    train_sft_stack,
)


def _config_hash(cfg: RunConfig, extra: str = "") -> str:
    """The result hash of a run: its config without the keys that are not part of the experiment (fp32 is the
    precision every earlier result had, so it is left out too and those results stay valid); the seed is kept."""
    d = experiment_config(to_dict(cfg))
    return fingerprint(d, extra)


@dataclass
class GridResult:
    spec: GridSpec
    out_dir: Path
    frame: pd.DataFrame  # tidy: world, variant, seed, split (val|test), stage, epoch, metrics, run info, run_dir
    per_query: pd.DataFrame  # world, variant, seed, stage (sft|grpo), query, per-query metrics (test split)
    best: str | None = None  # the variant '@best' resolved to
    executed: int = 0
    skipped: int = 0
    wall_s: float = 0.0
    _summaries: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)  # summary() cache

    def run_dir(self, variant: str, seed: int | None = None, world: str = BASE_WORLD) -> Path:
        """Where a run's ``metrics.csv``/``config.yaml`` live (what ``v3kit.diagnose`` reads)."""
        return _run_dir(self.out_dir, world, variant, self.spec.seeds[0] if seed is None else seed)

    def summary(
        self, *, n_boot: int = 2000, ci: float = 0.95, seed: int = 0, metrics: Sequence[str] | None = None
    ) -> pd.DataFrame:
        """:func:`summarize` of this grid with the grid's reference (cached per set of arguments)."""
        key = json.dumps([n_boot, ci, seed, list(metrics or [])])
        if key not in self._summaries:
            out = summarize(
                self.frame,
                self.per_query,
                reference=self.spec.reference,
                n_boot=n_boot,
                ci=ci,
                seed=seed,
                metrics=metrics,
            )
            out.attrs["test_frac"] = self.spec.base_config().data.test_frac  # the power advice reads the design
            self._summaries[key] = out
        return self._summaries[key]


def _run_dir(out: Path, world: str, variant: str, seed: int) -> Path:
    return out / world / variant / f"seed{seed}"


def _load_result(path: Path, expected_hash: str) -> dict[str, Any] | None:
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing or half-written by a killed older version: rerun
    return payload if payload.get("hash") == expected_hash else None


def _run_tasks(fn: Callable[[Any], Any], tasks: list[Any], bar: Any, backend: Any, errors: list[str]) -> None:
    def label(t: Any) -> str:
        return f"{t.world}/{getattr(t, 'variant', 'sft')}/seed{getattr(t, 'seed', t.cfg.seed)}"

    backend.run(fn, tasks, label, (lambda: bar.update(1)) if bar is not None else (lambda: None), errors)


def _in_stacks(
    planned: tuple[list[Any], list[Any]],
    stacked: Callable[[Any], Any],
    alone: Callable[[Any], Any],
    bar: Any,
    backend: Any,
    errors: list[str],
) -> None:
    """Run ``planned`` (stacks, tasks left alone): one task per stack (spread over the workers; its members finish
    together), then the others one by one."""
    stacks, rest = planned
    if stacks:
        _run_tasks(stacked, stacks, None, backend, errors)
        if bar is not None:
            bar.update(sum(len(s.tasks) for s in stacks))
    _run_tasks(alone, rest, bar, backend, errors)


def _run_runs(tasks: list[RunTask], bar: Any, backend: Any, errors: list[str], stack: str) -> None:
    """The grid's runs: in stacks where :func:`plan_stacks` groups them, the rest one by one."""
    _in_stacks(plan_stacks(tasks, stack), execute_stack, execute_run, bar, backend, errors)


def _run_sfts(tasks: list[SFTTask], bar: Any, backend: Any, errors: list[str], stack: str) -> None:
    """The grid's SFT trainings: in stacks where :func:`plan_sft_stacks` groups them, the rest one by one."""
    _in_stacks(plan_sft_stacks(tasks, stack), train_sft_stack, train_sft, bar, backend, errors)


def _grid_spec(spec: GridSpec | str | Path, overrides: Sequence[str]) -> GridSpec:
    """The grid to run: a loaded file with ``overrides``, or a given spec with ``overrides`` added to its base."""
    if not isinstance(spec, GridSpec):
        return load_grid(spec, overrides)
    if overrides:
        return dataclasses.replace(spec, base=[*spec.base, *overrides])
    return spec


def _grid_dir(spec: GridSpec, out_dir: str | Path | None, backend: str) -> Path:
    """Create the grid's output directory (default ``runs/ablate/<grid name>``) and write its ``grid.yaml``."""
    out = Path(out_dir) if out_dir is not None else Path("runs/ablate") / spec.name
    if backend == "ray":
        out = out.resolve()  # workers elsewhere do not share this process's working directory
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "grid.yaml", yaml.safe_dump(_spec_dict(spec), sort_keys=False))
    return out


def _open_tracking(out: Path, report_to: Sequence[str]) -> str | None:
    """Check the trackers' extras before anything trains; every run of the grid goes to one MLflow store (its URI,
    or None without MLflow)."""
    trackers.require(report_to)
    store = trackers.mlflow_uri(out, concurrent=True) if "mlflow" in report_to else None
    if store is not None:
        trackers.open_mlflow_store(store)
        print(trackers.mlflow_read_hint(store), flush=True)
    return store


@dataclass
class _RunPlanner:
    """The runs of a grid still to do: each with its resolved config, the SFT checkpoint it starts from and its
    tracking; a run whose ``result.json`` holds the same config hash is finished and skipped."""

    sft_plan: SFTPlan  # also holds the grid's out dir, spec and per-world SFT configs
    keep_checkpoints: bool
    report_to: Sequence[str]
    store: str | None  # the grid's MLflow store

    def tracking(self, world: str, variant: str, seed: int) -> dict[str, Any] | None:
        if not self.report_to:
            return None
        name = self.sft_plan.spec.name
        tags = {
            "grid": name,
            "world": world,
            "variant": variant,
            "seed": seed,
            "run": f"{name}/{world}/{variant}/seed{seed}",
        }
        return {"tags": tags, "mlflow_uri": self.store}

    def plan(self, world: str, variants: Iterable[str], seeds: Iterable[int]) -> tuple[list[RunTask], int]:
        """(the runs of ``world`` still to do, how many are finished)."""
        out, spec, sft_plan = self.sft_plan.out, self.sft_plan.spec, self.sft_plan
        tasks, skipped = [], 0
        for variant in variants:
            for seed in seeds:
                rd = _run_dir(out, world, variant, seed)
                cfg = spec.resolve(world, variant, seed, rd)
                path, key = sft_plan.sft_for(world, variant, cfg)
                h = _config_hash(cfg, key)
                result_path = rd / "result.json"
                if _load_result(result_path, h) is not None:
                    skipped += 1
                    continue
                tasks.append(
                    RunTask(
                        world=world,
                        variant=variant,
                        seed=seed,
                        cfg=cfg,
                        split_cfg=sft_plan.sft_cfgs[world],
                        sft_path=path,
                        result_path=result_path,
                        hash=h,
                        keep_checkpoints=self.keep_checkpoints,
                        tracking=self.tracking(world, variant, seed),
                    )
                )
        return tasks, skipped


def _run_other_worlds(
    planner: _RunPlanner, bar: Any, runner: Any, errors: list[str], stack: str
) -> tuple[int, int, str | None]:
    """The runs of the grid's other worlds (after the base world's, which ``@best`` is chosen from), with their own
    SFTs first; returns (runs started, runs skipped as finished, the variant ``@best`` resolved to)."""
    spec, out = planner.sft_plan.spec, planner.sft_plan.out
    best = None
    world_variants = list(spec.worlds.variants)
    if BEST in world_variants:
        best = best_variant(collect(out, spec, worlds=[BASE_WORLD]), spec)
        world_variants = list(dict.fromkeys(best if v == BEST else v for v in world_variants))
        if len(world_variants) < len(spec.worlds.variants):  # @best coincided with a listed variant
            bar.total -= len(spec.worlds.levels) * len(spec.worlds.seeds)
            bar.refresh()
    world_tasks, skipped = [], 0
    for world in spec.worlds.levels:
        tasks, s = planner.plan(world, world_variants, spec.worlds.seeds)
        world_tasks += tasks
        skipped += s
        bar.update(s)
    world_sft = planner.sft_plan.tasks_for(world_tasks)
    if world_sft:
        sft_errors: list[str] = []
        _run_sfts(world_sft, None, runner, sft_errors, stack)
        if sft_errors:
            raise RuntimeError(
                "SFT training failed, no variant of the other worlds can run:\n" + "\n".join(errors + sft_errors)
            )
    _run_runs(world_tasks, bar, runner, errors, stack)
    return len(world_tasks), skipped, best


def _finish_grid(
    spec: GridSpec, out: Path, best: str | None, executed: int, skipped: int, t0: float, workers: int, backend: str
) -> GridResult:
    """Collect the grid's results and write ``results.{csv,parquet}``, ``per_query.parquet``, ``summary.csv`` and
    ``timing.json``; ``executed``: the runs that finished in this call."""
    frame, per_query = collect(out, spec, return_per_query=True)
    atomic_write_frame(out / "results.csv", frame)
    atomic_write_frame(out / "results.parquet", frame)
    atomic_write_frame(out / "per_query.parquet", per_query)
    result = GridResult(
        spec=spec,
        out_dir=out,
        frame=frame,
        per_query=per_query,
        best=best,
        executed=executed,
        skipped=skipped,
        wall_s=time.perf_counter() - t0,
    )
    atomic_write_frame(out / "summary.csv", result.summary())
    atomic_write_text(
        out / "timing.json",
        json.dumps(
            {
                "wall_s": result.wall_s,
                "workers": workers,
                "backend": backend,
                "executed": result.executed,
                "skipped": skipped,
            }
        ),
    )
    return result


def run_grid(
    spec: GridSpec | str | Path,
    out_dir: str | Path | None = None,
    *,
    workers: int = 1,
    progress: bool = True,
    keep_checkpoints: bool = False,
    overrides: Sequence[str] = (),
    backend: str = "local",
    address: str | None = None,
    stack: str = "auto",
) -> GridResult:
    """Run every (world, variant, seed) of ``spec`` (skipping finished runs) and collect the tidy results.

    ``backend="local"``: ``workers > 1`` runs that many spawned processes with one torch thread each (worker k on
    ``cuda:(k mod G)`` when there are G >= 2 GPUs). ``backend="ray"``: every SFT and run is a Ray task on the
    cluster at ``address`` (None: a local Ray; see :mod:`v3kit.ablate.backends`, which also says why ``out_dir``
    must be on a filesystem every node shares). Either backend resumes a grid the other started. Outputs in ``out_dir``
    (default ``runs/ablate/<grid name>``): ``results.{csv,parquet}``, ``per_query.parquet``, ``summary.csv`` and
    one run directory per run (``<world>/<variant>/seed<k>/``).
    """
    t0 = time.perf_counter()
    spec = _grid_spec(spec, overrides)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    plan_stacks([], stack)  # an unknown mode fails before anything runs
    out = _grid_dir(spec, out_dir, backend)

    # SFT checkpoints: one per world and distinct SFT (data/model/sft settings; variants may change model.* and
    # sft.*), each trained once and shared by its variants and seeds; retrained only when its settings change.
    sft_cfgs = {
        w: spec.base_config(w, [f"seed={spec.sft_seed}", f"run_dir={out / w / 'sft'}", "progress=false"])
        for w in spec.world_names()
    }
    sft_plan = SFTPlan(out, spec, sft_cfgs)
    report_to = sft_cfgs[BASE_WORLD].report_to
    planner = _RunPlanner(sft_plan, keep_checkpoints, report_to, _open_tracking(out, report_to))

    base_tasks, skipped = planner.plan(BASE_WORLD, spec.variants, spec.seeds)
    sft_tasks = sft_plan.tasks_for(base_tasks)
    n_world_runs = 0
    if spec.worlds:
        n_world_runs = len(spec.worlds.levels) * len(spec.worlds.variants) * len(spec.worlds.seeds)
    total_runs = len(spec.variants) * len(spec.seeds) + n_world_runs
    errors: list[str] = []
    runner = make_backend(backend, workers=workers, out_dir=out, address=address, device=sft_cfgs[BASE_WORLD].device)
    bar = tqdm(total=total_runs, desc=f"ablate {spec.name}", unit="run", disable=not progress, dynamic_ncols=True)
    bar.update(skipped)
    executed = 0
    best = None
    try:
        if sft_tasks:
            sft_bar = tqdm(total=len(sft_tasks), desc="SFT per world", disable=not progress, leave=False)
            _run_sfts(sft_tasks, sft_bar, runner, errors, stack)
            sft_bar.close()
            if errors:
                raise RuntimeError("SFT training failed, no variant can run:\n" + "\n".join(errors))
        _run_runs(base_tasks, bar, runner, errors, stack)
        executed += len(base_tasks)
        if spec.worlds:
            n, s, best = _run_other_worlds(planner, bar, runner, errors, stack)
            executed += n
            skipped += s
    finally:
        bar.close()
        runner.close()
    if errors:
        raise RuntimeError(
            f"{len(errors)} run(s) failed (finished runs are saved; rerun to retry):\n" + "\n".join(errors)
        )
    return _finish_grid(spec, out, best, executed - len(errors), skipped, t0, workers, backend)


def _spec_dict(spec: GridSpec) -> dict[str, Any]:
    d = {
        "name": spec.name,
        "config": spec.config,
        "base": spec.base,
        "seeds": spec.seeds,
        "sft_seed": spec.sft_seed,
        "reference": spec.reference,
        "variants": spec.variants,
        "questions": {q: list(p) for q, p in spec.questions.items()},
    }
    if spec.sft_checkpoint is not None:
        d["sft_checkpoint"] = spec.sft_checkpoint
    if spec.worlds:
        d["worlds"] = {
            "levels": spec.worlds.levels,
            "variants": spec.worlds.variants,
            "seeds": spec.worlds.seeds,
            "best_metric": spec.worlds.best_metric,
            "best_of": spec.worlds.best_of,
        }
    return d


def collect(
    out_dir: str | Path, spec: GridSpec, *, worlds: Sequence[str] | None = None, return_per_query: bool = False
) -> Any:
    """Read every ``result.json`` of the grid under ``out_dir`` into the tidy frame (and per-query frame)."""
    out = Path(out_dir)
    rows, pq_frames = [], []
    for path in sorted(out.glob("*/*/seed*/result.json")):
        world, variant = path.parts[-4], path.parts[-3]
        if worlds is not None and world not in worlds:
            continue
        if variant not in spec.variants or (world != BASE_WORLD and world not in spec.world_names()):
            continue  # left over from an older grid
        payload = json.loads(path.read_text())
        seed = payload["seed"]
        if (world == BASE_WORLD and seed not in spec.seeds) or (
            world != BASE_WORLD and spec.worlds and seed not in spec.worlds.seeds
        ):
            continue
        run_cols = {**payload["info"], "wall_s": payload["wall_s"], "run_dir": payload["run_dir"]}
        rows += [{**r, **run_cols} for r in payload["rows"]]
        if return_per_query:
            for stage, metrics in payload["per_query"].items():
                f = pd.DataFrame(metrics)
                f.insert(0, "query", np.arange(len(f)))
                f.insert(0, "stage", stage)
                f.insert(0, "seed", seed)
                f.insert(0, "variant", variant)
                f.insert(0, "world", world)
                pq_frames.append(f)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        order = {v: i for i, v in enumerate(spec.variants)}
        frame["_o"] = frame["variant"].map(order)
        frame["_w"] = frame["world"].map({w: i for i, w in enumerate(spec.world_names())})
        frame["_s"] = frame["stage"].map({"sft": 0, "rce": 1, "grpo": 2, "selected": 3})
        frame = frame.sort_values(["_w", "_o", "seed", "split", "_s", "epoch"]).drop(columns=["_o", "_w", "_s"])
        frame = frame.reset_index(drop=True)
    if not return_per_query:
        return frame
    per_query = pd.concat(pq_frames, ignore_index=True) if pq_frames else pd.DataFrame()
    return frame, per_query


def best_metric(frame: pd.DataFrame, spec: GridSpec) -> str:
    """What "best" is judged by: the grid's ``worlds.best_metric``, else ``utility@1`` where the data has a true
    utility, else the label metric ``acc@1`` (real data)."""
    if spec.worlds:
        return spec.worlds.best_metric
    has_utility = "utility@1" in frame.columns and frame["utility@1"].notna().any()
    return "utility@1" if has_utility else "acc@1"


def best_variant(frame: pd.DataFrame, spec: GridSpec, metric: str | None = None) -> str:
    """The variant with the best mean final test ``metric`` (default :func:`best_metric`) on the base world, among
    ``worlds.best_of`` (default: every variant that runs GRPO, except the reference)."""
    metric = metric or best_metric(frame, spec)
    candidates = (
        spec.worlds.best_of
        if spec.worlds and spec.worlds.best_of
        else [v for v in spec.variants if v != spec.reference and spec.value(v, "grpo.epochs") > 0]
    )
    final = frame[(frame["world"] == BASE_WORLD) & (frame["split"] == "test") & (frame["stage"] == "grpo")]
    means = final[final["variant"].isin(candidates)].groupby("variant")[metric].mean()
    if means.empty:
        raise GridError(f"no finished run among the @best candidates {candidates}")
    return str(means.idxmax() if METRIC_DIRECTION[metric] >= 0 else means.idxmin())
