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
from ..provenance import NOT_EXPERIMENT_KEYS, RUNNER_KEYS, fingerprint
from ..rundir import atomic_write_frame, atomic_write_text
from .backends import make_backend, worker_config
from .grid import (
    _RUN_INFO,
    BASE_WORLD,
    BEST,
    METRIC_DIRECTION,
    PER_QUERY_METRICS,
    GridError,
    GridSpec,
    load_grid,
)
from .stats import summarize
from .tasks import _RunTask, _SFTPlan, _SFTTask


def _config_hash(cfg: RunConfig, extra: str = "") -> str:
    """The result hash of a run: its config without the keys that are not part of the experiment (fp32 is the
    precision every earlier result had, so it is left out too and those results stay valid); the seed is kept."""
    d = to_dict(cfg)
    for k in (*RUNNER_KEYS, *NOT_EXPERIMENT_KEYS):
        d.pop(k, None)
    if d.get("precision") == "fp32":
        d.pop("precision")
    d["seed"] = cfg.seed
    return fingerprint(d, extra)


def per_query_outcomes(
    model: Any, data: Any, temperature: float, reference: Any, ref_logp: Any = None
) -> dict[str, np.ndarray]:
    """Per test query: the :data:`PER_QUERY_METRICS` of ``model`` (their means are
    :func:`v3kit.train.metrics.ranking_metrics`'s values; ``ndcg@5`` is NaN for queries with all rewards equal).
    ``ref_logp``: ``reference``'s log-probs on ``data`` when the caller already has them."""
    from ..train.metrics import per_group_metrics
    from ..train.model import compute_log_probs

    logp = compute_log_probs(model, data, temperature)
    ref = compute_log_probs(reference, data, temperature) if ref_logp is None else ref_logp
    out = per_group_metrics(logp, data.labels, data.rewards, data.mask, utility=data.utility, logp=logp, ref_logp=ref)
    return {k: v.double().numpy() for k, v in out.items() if k in PER_QUERY_METRICS}


_SPLITS_CACHE: dict[str, Any] = {}


def _splits_for(cfg: RunConfig) -> Any:
    """The world's splits (cached per process: every run of a world in this worker reuses them)."""
    from ..pipeline import prepare_data

    key = json.dumps({"data": to_dict(cfg)["data"], "seed": cfg.seed}, sort_keys=True, default=str)
    if key not in _SPLITS_CACHE:
        _SPLITS_CACHE.clear()  # one world at a time is plenty; keeps memory flat
        _SPLITS_CACHE[key] = prepare_data(cfg)
    return _SPLITS_CACHE[key]


def _train_sft(task: _SFTTask) -> str:
    from ..pipeline import sft_select_metric
    from ..train.device import resolve_device, resolve_precision
    from ..train.sft import train_sft

    splits = _splits_for(task.cfg)
    cfg = worker_config(task.cfg)  # the worker's device, as its runs get
    device = resolve_device(cfg.device)
    train_sft(
        splits,
        cfg.model,
        cfg.sft,
        select_metric=sft_select_metric(cfg),
        seed=cfg.seed,
        run_dir=task.path.parent,
        progress=False,
        device=device,
        precision=resolve_precision(cfg.precision, device, warn=False),
    )
    for p in task.path.parent.glob("sft_epoch*.pt"):  # sft.pt is the checkpoint every run loads
        p.unlink()
    atomic_write_text(task.path.parent / "sft.hash", task.hash)
    return task.world


def _execute(task: _RunTask) -> dict[str, Any]:
    """Run one (world, variant, seed) from the shared SFT checkpoint and write its ``result.json``."""
    from ..data.reward_stats import label_reward_agreement
    from ..pipeline import run_pipeline, update_run_info

    t0 = time.perf_counter()
    splits = _splits_for(task.split_cfg)
    cfg = worker_config(task.cfg)  # one thread in a worker, and its GPU; run_pipeline sets the threads
    res = run_pipeline(cfg, sft_checkpoint=task.sft_path, splits=splits, tracking=task.tracking)
    run_dir = Path(task.cfg.run_dir)
    update_run_info(run_dir, split_seed=task.split_cfg.seed)  # the doctor rebuilds the split the run trained on
    keys = {"world": task.world, "variant": task.variant, "seed": task.seed}
    info = {k: float(res.grpo.info[k]) for k in _RUN_INFO if k in res.grpo.info}
    # How often the reward's top candidate is the label on the test split: what the conclusions read label metrics
    # against, above all on real data without a true utility.
    info["reward_label_agreement"] = label_reward_agreement(splits.test)
    if res.debias is not None:
        info.update({k: v for k, v in res.debias.as_dict().items() if isinstance(v, float)})
    if res.selection is not None:
        info["selected_stage"] = res.selection.stage
        info["selected_epoch"] = float(res.selection.epoch)
    rows = []
    for stage, hist in (("rce", res.rce.eval_history), ("grpo", res.grpo.eval_history)):
        for rec in hist.to_dict("records"):
            row = {**keys, "split": "val", "stage": stage, "epoch": int(rec["epoch"])}
            row.update({m: rec[m] for m in METRIC_DIRECTION if m in rec and pd.notna(rec[m])})
            rows.append(row)
    epochs = {
        "sft": task.cfg.sft.epochs,
        "rce": task.cfg.rce.epochs,
        "grpo": task.cfg.grpo.epochs,
        "selected": res.selection.epoch if res.selection is not None else task.cfg.grpo.epochs,
    }
    for stage, rec in res.table.iterrows():
        rows.append(
            {**keys, "split": "test", "stage": stage, "epoch": epochs[stage], **{k: float(v) for k, v in rec.items()}}
        )
    temperature = res.stage1.model_config.sim_temperature  # as pipeline.stage_table evaluates
    test = splits.test
    from ..train.model import compute_log_probs

    ref_logp = compute_log_probs(res.models["sft"], test, temperature)  # once for every model
    outcomes: dict[int, dict[str, list[float]]] = {}  # once per model: 'selected' is often 'grpo' or 'sft'
    pq = {}
    for name in ("sft", "grpo", "selected"):
        model = res.models.get(name)
        if model is None:
            continue
        if id(model) not in outcomes:
            got = per_query_outcomes(model, test, temperature, res.models["sft"], ref_logp=ref_logp)
            outcomes[id(model)] = {k: v.tolist() for k, v in got.items()}
        pq[name] = outcomes[id(model)]
    wall = time.perf_counter() - t0
    payload = {
        "hash": task.hash,
        **keys,
        "run_dir": str(run_dir),
        "wall_s": wall,
        "info": info,
        "rows": rows,
        "per_query": pq,
        "query_ids": list(test.query_ids),
    }
    if not task.keep_checkpoints:  # ~5 MB of per-epoch checkpoints per run; metrics.csv is what the doctor reads
        for p in run_dir.glob("*_epoch*.pt"):
            p.unlink()
    atomic_write_text(task.result_path, json.dumps(payload))
    return {**keys, "wall_s": wall}


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
    if not isinstance(spec, GridSpec):
        spec = load_grid(spec, overrides)
    elif overrides:
        spec = dataclasses.replace(spec, base=[*spec.base, *overrides])
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out_dir) if out_dir is not None else Path("runs/ablate") / spec.name
    if backend == "ray":
        out = out.resolve()  # workers elsewhere do not share this process's working directory
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "grid.yaml", yaml.safe_dump(_spec_dict(spec), sort_keys=False))

    # SFT checkpoints: one per world and distinct SFT (data/model/sft settings; variants may change model.* and
    # sft.*), each trained once and shared by its variants and seeds; retrained only when its settings change.
    sft_cfgs = {
        w: spec.base_config(w, [f"seed={spec.sft_seed}", f"run_dir={out / w / 'sft'}", "progress=false"])
        for w in spec.world_names()
    }
    sft_plan = _SFTPlan(out, spec, sft_cfgs)

    # report_to: the extras are checked here, before anything trains; every run of the grid goes to one MLflow store.
    report_to = sft_cfgs[BASE_WORLD].report_to
    trackers.require(report_to)
    store = trackers.mlflow_uri(out) if "mlflow" in report_to else None
    if store is not None:
        trackers.open_mlflow_store(store)

    def tracking(world: str, variant: str, seed: int) -> dict[str, Any] | None:
        if not report_to:
            return None
        tags = {
            "grid": spec.name,
            "world": world,
            "variant": variant,
            "seed": seed,
            "run": f"{spec.name}/{world}/{variant}/seed{seed}",
        }
        return {"tags": tags, "mlflow_uri": store}

    def plan(world: str, variants: Iterable[str], seeds: Iterable[int]) -> tuple[list[_RunTask], int]:
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
                    _RunTask(
                        world=world,
                        variant=variant,
                        seed=seed,
                        cfg=cfg,
                        split_cfg=sft_cfgs[world],
                        sft_path=path,
                        result_path=result_path,
                        hash=h,
                        keep_checkpoints=keep_checkpoints,
                        tracking=tracking(world, variant, seed),
                    )
                )
        return tasks, skipped

    base_tasks, skipped = plan(BASE_WORLD, spec.variants, spec.seeds)
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
            _run_tasks(_train_sft, sft_tasks, sft_bar, runner, errors)
            sft_bar.close()
            if errors:
                raise RuntimeError("SFT training failed, no variant can run:\n" + "\n".join(errors))
        _run_tasks(_execute, base_tasks, bar, runner, errors)
        executed += len(base_tasks)
        if spec.worlds:
            world_variants = list(spec.worlds.variants)
            if BEST in world_variants:
                best = best_variant(collect(out, spec, worlds=[BASE_WORLD]), spec)
                world_variants = list(dict.fromkeys(best if v == BEST else v for v in world_variants))
                if len(world_variants) < len(spec.worlds.variants):  # @best coincided with a listed variant
                    bar.total -= len(spec.worlds.levels) * len(spec.worlds.seeds)
                    bar.refresh()
            world_tasks = []
            for world in spec.worlds.levels:
                tasks, s = plan(world, world_variants, spec.worlds.seeds)
                world_tasks += tasks
                skipped += s
                bar.update(s)
            world_sft = sft_plan.tasks_for(world_tasks)
            if world_sft:
                sft_errors: list[str] = []
                _run_tasks(_train_sft, world_sft, None, runner, sft_errors)
                if sft_errors:
                    raise RuntimeError(
                        "SFT training failed, no variant of the other worlds can run:\n"
                        + "\n".join(errors + sft_errors)
                    )
            _run_tasks(_execute, world_tasks, bar, runner, errors)
            executed += len(world_tasks)
    finally:
        bar.close()
        runner.close()
    if errors:
        raise RuntimeError(
            f"{len(errors)} run(s) failed (finished runs are saved; rerun to retry):\n" + "\n".join(errors)
        )
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
        executed=executed - len(errors),
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
