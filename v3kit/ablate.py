"""Seeded ablations of the v3 pipeline: named variants x seeds (x synthetic worlds), with bootstrap intervals.

A *grid* (YAML) names variants, each a list of ``key=value`` config overrides applied on top of ``base``::

    config: null                  # optional base config file (default: the seed settings)
    base: [data.synthetic.n_queries=3000]
    seeds: [0, 1, 2]
    reference: seed               # the variant "vs the seed" compares with
    variants:
      sft_only: [rce.epochs=0, grpo.epochs=0]
      seed: []
      old_refresh_start: [grpo.old_policy=refresh_at_start]
    questions:                    # optional: named pairwise comparisons the conclusions answer
      "More RCE (10 epochs) before GRPO?": [rce10_grpo8, seed]
    worlds:                       # optional (issue 4 part 5): rerun a few variants in other synthetic worlds
      seeds: [0, 1, 2]
      variants: [sft_only, seed, "@best"]   # @best: the best GRPO variant of the base world on best_metric
      best_metric: utility@1
      levels:
        bias_0: [data.synthetic.reward_bias=0.0]

Design choices (why):

* **One SFT checkpoint per world**, trained once with ``sft_seed`` and reused by every variant and seed, so a
  difference between variants is never a difference between SFT models. The train/val/test split is the SFT's
  (``split_by_query`` with ``sft_seed``) for every run, otherwise a run seed would move SFT training queries into
  its test set. Run seeds therefore vary only what happens after SFT (batch order, sampling). Variants may not
  touch ``data``/``model``/``sft`` (that would need another SFT); worlds may.
* **Uncertainty** (see :func:`summarize`): a two-level bootstrap over run seeds *and* test queries, on per-query
  outcomes paired with the same SFT model on the same queries. Seeds alone (3-5 values) ignore that the test set is
  a sample; queries alone ignore training noise. Both are resampled, so "worse than SFT" means the interval of the
  paired difference excludes 0.
* **Resumable**: every finished run writes ``result.json`` atomically (temp file + ``os.replace``) together with a
  hash of its resolved config; a rerun skips runs whose file exists with the same hash and reruns changed ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import yaml
from tqdm.auto import tqdm

from .config import ConfigError, RunConfig, load_config, parse_override, to_dict

# Metrics where larger is better (+1), smaller is better (-1), or neither (0: descriptive only).
METRIC_DIRECTION: dict[str, int] = {
    "acc@1": 1, "mrr": 1, "ndcg@5": 1, "reward@1": 1, "utility@1": 1, "regret@1": -1, "kl_to_sft": 0, "entropy": 0,
}
KEY_METRICS = ("acc@1", "reward@1", "utility@1")
# Metrics computed per test query (so the bootstrap can resample queries); ndcg@5 falls back to seeds only.
PER_QUERY_METRICS = ("acc@1", "mrr", "ndcg@5", "reward@1", "regret@1", "utility@1", "kl_to_sft", "entropy")
BASE_WORLD = "default"
BEST = "@best"
_RUN_INFO = ("step0_ratio_mean", "step0_ratio_std", "step0_ratio_min", "step0_ratio_max", "step0_outside_clip")
_SHARED_SECTIONS = ("data", "model", "sft")  # fixed by the world's SFT checkpoint
_RUNNER_KEYS = ("seed", "run_dir", "progress")  # set by the runner for every run


class GridError(ConfigError):
    """A grid spec is invalid; the message names the variant/world and the key."""


# --------------------------------------------------------------------------------------------------- the spec
@dataclass
class WorldSweep:
    """Issue 4 part 5: the key comparison rerun in other synthetic worlds (``levels``: name -> overrides)."""

    levels: dict[str, list[str]]
    variants: list[str]
    seeds: list[int]
    best_metric: str = "utility@1"
    best_of: list[str] | None = None  # candidates for @best (default: every variant that runs GRPO, but the reference)


@dataclass
class GridSpec:
    variants: dict[str, list[str]]
    seeds: list[int]
    base: list[str] = field(default_factory=list)
    config: str | None = None
    reference: str | None = None
    sft_seed: int = 0
    questions: dict[str, tuple[str, str]] = field(default_factory=dict)
    worlds: WorldSweep | None = None
    name: str = "grid"

    def base_config(self, world: str = BASE_WORLD, extra: Sequence[str] = ()) -> RunConfig:
        return load_config(self.config, [*self.base, *self.world_overrides(world), *extra])

    def world_overrides(self, world: str) -> list[str]:
        if world == BASE_WORLD:
            return []
        if self.worlds is None or world not in self.worlds.levels:
            raise GridError(f"unknown world {world!r}; the grid has {self.world_names()}")
        return list(self.worlds.levels[world])

    def world_names(self) -> list[str]:
        return [BASE_WORLD] + (list(self.worlds.levels) if self.worlds else [])

    def resolve(self, world: str, variant: str, seed: int, run_dir: str | Path = "runs/ablate") -> RunConfig:
        """The full config of one run (raises :class:`GridError` naming the variant and key on a bad override)."""
        runner = [f"seed={seed}", f"run_dir={run_dir}", "progress=false"]
        try:
            return load_config(self.config, [*self.base, *self.world_overrides(world), *self.variants[variant],
                                             *runner])
        except GridError:
            raise
        except ConfigError as e:
            raise GridError(f"variant {variant!r} (world {world!r}): {e}") from None

    def value(self, variant: str, key: str, world: str = BASE_WORLD) -> Any:
        """The resolved value of dotted ``key`` in a variant's config (e.g. for sweep plot axes)."""
        node: Any = self.resolve(world, variant, self.seeds[0])
        for part in key.split("."):
            node = getattr(node, part)
        return node


def _str_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise GridError(f"{where} must be a list of 'key=value' strings, got {value!r}")
    return list(value)


def _seed_list(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value):
        raise GridError(f"{where} must be a non-empty list of integers, e.g. [0, 1, 2]; got {value!r}")
    if len(set(value)) != len(value):
        raise GridError(f"{where} has repeated seeds: {value}")
    return list(value)


def _check_keys(raw: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise GridError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def parse_grid(raw: Mapping[str, Any], *, name: str = "grid", extra_base: Sequence[str] = (),
               base_dir: str | Path | None = None) -> GridSpec:
    """Build and validate a :class:`GridSpec` from a mapping (the parsed YAML); every run config is resolved once
    here so that a typo fails before any training, with the variant and key in the message."""
    if not isinstance(raw, Mapping):
        raise GridError(f"a grid must be a mapping with 'variants' and 'seeds', got {type(raw).__name__}")
    _check_keys(raw, ("name", "config", "base", "seeds", "sft_seed", "reference", "variants", "questions",
                      "worlds"), "grid")
    config = raw.get("config")
    if config is not None and base_dir is not None and not Path(config).exists():
        config = str(Path(base_dir) / config)  # relative to the grid file when not relative to the cwd
    variants_raw = raw.get("variants")
    if not isinstance(variants_raw, Mapping) or not variants_raw:
        raise GridError("grid.variants must be a non-empty mapping of name -> list of 'key=value' overrides")
    variants = {str(k): _str_list(v, f"variant {k!r}") for k, v in variants_raw.items()}
    for vname, overrides in variants.items():
        for text in overrides:
            try:
                keys, _ = parse_override(text)
            except ConfigError as e:
                raise GridError(f"variant {vname!r}: {e}") from None
            if keys[0] in _SHARED_SECTIONS:
                raise GridError(f"variant {vname!r} sets '{'.'.join(keys)}', but data/model/sft are fixed by the "
                                "world's shared SFT checkpoint; move it to 'base' or to a world in 'worlds.levels'")
            if keys[0] in _RUNNER_KEYS:
                raise GridError(f"variant {vname!r} sets '{keys[0]}', which the runner sets for every run; use "
                                "the grid's 'seeds' (or 'sft_seed') instead")
    seeds = _seed_list(raw.get("seeds"), "grid.seeds")
    sft_seed = raw.get("sft_seed", 0)
    if not isinstance(sft_seed, int):
        raise GridError(f"grid.sft_seed must be an integer, got {sft_seed!r}")
    reference = raw.get("reference")
    if reference is not None and reference not in variants:
        raise GridError(f"grid.reference {reference!r} is not a variant; variants: {list(variants)}")
    questions = {}
    for q, pair in (raw.get("questions") or {}).items():
        if not (isinstance(pair, list) and len(pair) == 2 and all(p in variants for p in pair)):
            raise GridError(f"question {q!r} must be [variant_a, variant_b] naming two variants, got {pair!r}")
        questions[str(q)] = (pair[0], pair[1])
    worlds = None
    if raw.get("worlds"):
        w = raw["worlds"]
        _check_keys(w, ("levels", "variants", "seeds", "best_metric", "best_of"), "grid.worlds")
        levels = w.get("levels")
        if not isinstance(levels, Mapping) or not levels:
            raise GridError("grid.worlds.levels must map a world name to a list of overrides")
        if BASE_WORLD in levels:
            raise GridError(f"grid.worlds.levels may not use the name {BASE_WORLD!r} (the base world)")
        wvars = w.get("variants")
        if not isinstance(wvars, list) or not wvars:
            raise GridError("grid.worlds.variants must list the variants to rerun, e.g. [sft_only, seed, '@best']")
        for v in wvars:
            if v != BEST and v not in variants:
                raise GridError(f"grid.worlds.variants names {v!r}, which is not a variant (or '{BEST}')")
        best_metric = w.get("best_metric", "utility@1")
        if best_metric not in METRIC_DIRECTION or METRIC_DIRECTION[best_metric] == 0:
            raise GridError(f"grid.worlds.best_metric must be one of "
                            f"{[m for m, d in METRIC_DIRECTION.items() if d]}, got {best_metric!r}")
        best_of = w.get("best_of")
        if best_of is not None and (not isinstance(best_of, list) or any(b not in variants for b in best_of)):
            raise GridError(f"grid.worlds.best_of must list variants, got {best_of!r}")
        worlds = WorldSweep(levels={str(k): _str_list(v, f"world {k!r}") for k, v in levels.items()},
                            variants=list(wvars), seeds=_seed_list(w.get("seeds", seeds), "grid.worlds.seeds"),
                            best_metric=best_metric, best_of=best_of)
    spec = GridSpec(variants=variants, seeds=seeds, base=[*_str_list(raw.get("base"), "grid.base"), *extra_base],
                    config=config, reference=reference, sft_seed=sft_seed, questions=questions, worlds=worlds,
                    name=str(raw.get("name", name)))
    for world in spec.world_names():  # resolve everything now: fail fast, naming the culprit
        try:
            spec.base_config(world)
        except ConfigError as e:
            raise GridError(f"{'base' if world == BASE_WORLD else f'world {world!r}'}: {e}") from None
        for vname in variants:
            spec.resolve(world, vname, seeds[0])
    return spec


def load_grid(path: str | Path, overrides: Sequence[str] = ()) -> GridSpec:
    """Read a grid YAML; ``overrides`` (``--set``) are appended to its ``base``."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise GridError(f"grid file {path} is not valid YAML: {e}") from None
    return parse_grid(raw, name=path.stem, extra_base=overrides, base_dir=path.parent)


def find_grid(grid: str | Path) -> Path:
    """``grid`` if it exists from the cwd, else relative to the repository root (so ``configs/ablate_smoke.yaml``
    works from ``notebooks/`` or a papermill temp dir)."""
    path = Path(grid)
    if path.exists() or path.is_absolute():
        return path
    in_repo = Path(__file__).resolve().parents[1] / path
    if in_repo.exists():
        return in_repo
    raise GridError(f"grid file {grid} found neither from {Path.cwd()} nor in the repository ({in_repo})")


def single_key_variants(spec: GridSpec, key: str) -> list[str]:
    """The reference plus every variant whose overrides set only ``key`` (a one-knob sweep), ordered by value."""
    found = [v for v, ov in spec.variants.items()
             if ov and all(".".join(parse_override(o)[0]) == key for o in ov)]
    if spec.reference is not None and spec.reference not in found:
        found.append(spec.reference)
    return sorted(found, key=lambda v: spec.value(v, key))


# --------------------------------------------------------------------------------------------------- one run
# Where and how fast a run computes does not change what it is (fp32 is the precision every earlier result had,
# so it is left out too and those results stay valid).
_COMPUTE_KEYS = ("device", "threads", "log_every")


def _config_hash(cfg: RunConfig, extra: str = "") -> str:
    d = to_dict(cfg)
    for k in (*_RUNNER_KEYS, *_COMPUTE_KEYS):
        d.pop(k, None)
    if d.get("precision") == "fp32":
        d.pop("precision")
    d["seed"] = cfg.seed
    return hashlib.sha1((json.dumps(d, sort_keys=True, default=str) + extra).encode()).hexdigest()[:16]


def _sft_hash(cfg: RunConfig) -> str:
    d = {k: to_dict(cfg)[k] for k in _SHARED_SECTIONS}
    d["seed"] = cfg.seed
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_frame(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".parquet":
        frame.to_parquet(tmp, index=False)
    else:
        frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def per_query_outcomes(model: Any, data: Any, temperature: float, reference: Any) -> dict[str, np.ndarray]:
    """Per test query: the :data:`PER_QUERY_METRICS` of ``model`` (their means are
    :func:`v3kit.metrics.ranking_metrics`'s values; ``ndcg@5`` is NaN for queries with all rewards equal)."""
    from .metrics import per_group_metrics
    from .model import compute_log_probs

    logp = compute_log_probs(model, data, temperature)
    ref = compute_log_probs(reference, data, temperature)
    out = per_group_metrics(logp, data.labels, data.rewards, data.mask, utility=data.utility, logp=logp,
                            ref_logp=ref)
    return {k: v.double().numpy() for k, v in out.items() if k in PER_QUERY_METRICS}


_SPLITS_CACHE: dict[str, Any] = {}


def _splits_for(cfg: RunConfig) -> Any:
    """The world's splits (cached per process: every run of a world in this worker reuses them)."""
    from .pipeline import prepare_data

    key = json.dumps({"data": to_dict(cfg)["data"], "seed": cfg.seed}, sort_keys=True, default=str)
    if key not in _SPLITS_CACHE:
        _SPLITS_CACHE.clear()  # one world at a time is plenty; keeps memory flat
        _SPLITS_CACHE[key] = prepare_data(cfg)
    return _SPLITS_CACHE[key]


@dataclass
class _SFTTask:
    world: str
    cfg: RunConfig
    path: Path
    hash: str


@dataclass
class _RunTask:
    world: str
    variant: str
    seed: int
    cfg: RunConfig
    split_cfg: RunConfig  # the world's SFT config: its seed fixes the split
    sft_path: Path
    result_path: Path
    hash: str
    keep_checkpoints: bool = False


_IN_WORKER = False


def _worker_init() -> None:
    import torch

    global _IN_WORKER
    _IN_WORKER = True
    torch.set_num_threads(1)  # N workers x 1 thread each: no oversubscription of the cores


def _train_sft(task: _SFTTask) -> str:
    from .sft import train_sft

    splits = _splits_for(task.cfg)
    train_sft(splits, task.cfg.model, task.cfg.sft, seed=task.cfg.seed, run_dir=task.path.parent, progress=False)
    for p in task.path.parent.glob("sft_epoch*.pt"):  # sft.pt is the checkpoint every run loads
        p.unlink()
    _atomic_write(task.path.parent / "sft.hash", task.hash)
    return task.world


def _execute(task: _RunTask) -> dict[str, Any]:
    """Run one (world, variant, seed) from the shared SFT checkpoint and write its ``result.json``."""
    from .pipeline import run_pipeline

    t0 = time.perf_counter()
    splits = _splits_for(task.split_cfg)
    cfg = dataclasses.replace(task.cfg, threads=1) if _IN_WORKER else task.cfg  # run_pipeline sets the threads
    res = run_pipeline(cfg, sft_checkpoint=task.sft_path, splits=splits)
    run_dir = Path(task.cfg.run_dir)
    keys = {"world": task.world, "variant": task.variant, "seed": task.seed}
    info = {k: float(res.grpo.info[k]) for k in _RUN_INFO if k in res.grpo.info}
    rows = []
    for stage, hist in (("rce", res.rce.eval_history), ("grpo", res.grpo.eval_history)):
        for rec in hist.to_dict("records"):
            row = {**keys, "split": "val", "stage": stage, "epoch": int(rec["epoch"])}
            row.update({m: rec[m] for m in METRIC_DIRECTION if m in rec and pd.notna(rec[m])})
            rows.append(row)
    epochs = {"sft": task.cfg.sft.epochs, "rce": task.cfg.rce.epochs, "grpo": task.cfg.grpo.epochs}
    for stage, rec in res.table.iterrows():
        rows.append({**keys, "split": "test", "stage": stage, "epoch": epochs[stage],
                     **{k: float(v) for k, v in rec.items()}})
    temperature = res.stage1.model_config.sim_temperature  # as pipeline.stage_table evaluates
    test = splits.test
    pq = {name: {k: v.tolist() for k, v in per_query_outcomes(res.models[name], test, temperature,
                                                               res.models["sft"]).items()}
          for name in ("sft", "grpo")}
    wall = time.perf_counter() - t0
    payload = {"hash": task.hash, **keys, "run_dir": str(run_dir), "wall_s": wall, "info": info, "rows": rows,
               "per_query": pq, "query_ids": list(test.query_ids)}
    if not task.keep_checkpoints:  # ~5 MB of per-epoch checkpoints per run; metrics.csv is what the doctor reads
        for p in run_dir.glob("*_epoch*.pt"):
            p.unlink()
    _atomic_write(task.result_path, json.dumps(payload))
    return {**keys, "wall_s": wall}


# --------------------------------------------------------------------------------------------------- the grid
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

    def summary(self, *, n_boot: int = 2000, ci: float = 0.95, seed: int = 0,
                metrics: Sequence[str] | None = None) -> pd.DataFrame:
        """:func:`summarize` of this grid with the grid's reference (cached per set of arguments)."""
        key = json.dumps([n_boot, ci, seed, list(metrics or [])])
        if key not in self._summaries:
            self._summaries[key] = summarize(self.frame, self.per_query, reference=self.spec.reference,
                                             n_boot=n_boot, ci=ci, seed=seed, metrics=metrics)
        return self._summaries[key]


def _run_dir(out: Path, world: str, variant: str, seed: int) -> Path:
    return out / world / variant / f"seed{seed}"


def _load_result(path: Path, expected_hash: str) -> dict[str, Any] | None:
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing or half-written by a killed older version: rerun
    return payload if payload.get("hash") == expected_hash else None


def _run_tasks(fn: Callable[[Any], Any], tasks: list[Any], workers: int, bar: Any, pool: Any,
               errors: list[str]) -> None:
    def label(t: Any) -> str:
        return f"{t.world}/{getattr(t, 'variant', 'sft')}/seed{getattr(t, 'seed', t.cfg.seed)}"

    if pool is None:
        for t in tasks:
            try:
                fn(t)
            except Exception:  # keep the other runs going; report them all at the end
                errors.append(f"{label(t)}:\n{traceback.format_exc()}")
            if bar is not None:
                bar.update(1)
        return
    futures = {pool.submit(fn, t): t for t in tasks}
    for fut in as_completed(futures):
        try:
            fut.result()
        except Exception as e:
            errors.append(f"{label(futures[fut])}: {type(e).__name__}: {e}")
        if bar is not None:
            bar.update(1)


def run_grid(
    spec: GridSpec | str | Path,
    out_dir: str | Path | None = None,
    *,
    workers: int = 1,
    progress: bool = True,
    keep_checkpoints: bool = False,
    overrides: Sequence[str] = (),
) -> GridResult:
    """Run every (world, variant, seed) of ``spec`` (skipping finished runs) and collect the tidy results.

    ``workers > 1`` runs that many spawned processes with one torch thread each. Outputs in ``out_dir``
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
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "grid.yaml", yaml.safe_dump(_spec_dict(spec), sort_keys=False))

    # SFT checkpoints, one per world (retrained only if the data/model/sft config changed).
    sft_tasks, sft_cfgs = [], {}
    for world in spec.world_names():
        cfg = spec.base_config(world, [f"seed={spec.sft_seed}", f"run_dir={out / world / 'sft'}", "progress=false"])
        sft_cfgs[world] = cfg
        path, h = out / world / "sft" / "sft.pt", _sft_hash(cfg)
        hash_file = path.parent / "sft.hash"
        if not (path.exists() and hash_file.exists() and hash_file.read_text() == h):
            sft_tasks.append(_SFTTask(world=world, cfg=cfg, path=path, hash=h))

    def plan(world: str, variants: Iterable[str], seeds: Iterable[int]) -> tuple[list[_RunTask], int]:
        tasks, skipped = [], 0
        sft_cfg = sft_cfgs[world]
        for variant in variants:
            for seed in seeds:
                rd = _run_dir(out, world, variant, seed)
                cfg = spec.resolve(world, variant, seed, rd)
                h = _config_hash(cfg, _sft_hash(sft_cfg))
                result_path = rd / "result.json"
                if _load_result(result_path, h) is not None:
                    skipped += 1
                    continue
                tasks.append(_RunTask(world=world, variant=variant, seed=seed, cfg=cfg, split_cfg=sft_cfg,
                                      sft_path=out / world / "sft" / "sft.pt", result_path=result_path, hash=h,
                                      keep_checkpoints=keep_checkpoints))
        return tasks, skipped

    base_tasks, skipped = plan(BASE_WORLD, spec.variants, spec.seeds)
    n_world_runs = 0
    if spec.worlds:
        n_world_runs = len(spec.worlds.levels) * len(spec.worlds.variants) * len(spec.worlds.seeds)
    total_runs = len(spec.variants) * len(spec.seeds) + n_world_runs
    errors: list[str] = []
    pool = None
    if workers > 1:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_worker_init)
    bar = tqdm(total=total_runs, desc=f"ablate {spec.name}", unit="run", disable=not progress, dynamic_ncols=True)
    bar.update(skipped)
    executed = 0
    best = None
    try:
        if sft_tasks:
            sft_bar = tqdm(total=len(sft_tasks), desc="SFT per world", disable=not progress, leave=False)
            _run_tasks(_train_sft, sft_tasks, workers, sft_bar, pool, errors)
            sft_bar.close()
            if errors:
                raise RuntimeError("SFT training failed, no variant can run:\n" + "\n".join(errors))
        _run_tasks(_execute, base_tasks, workers, bar, pool, errors)
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
            _run_tasks(_execute, world_tasks, workers, bar, pool, errors)
            executed += len(world_tasks)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if errors:
        raise RuntimeError(f"{len(errors)} run(s) failed (finished runs are saved; rerun to retry):\n"
                           + "\n".join(errors))
    frame, per_query = collect(out, spec, return_per_query=True)
    _atomic_frame(frame, out / "results.csv")
    _atomic_frame(frame, out / "results.parquet")
    _atomic_frame(per_query, out / "per_query.parquet")
    result = GridResult(spec=spec, out_dir=out, frame=frame, per_query=per_query, best=best,
                        executed=executed - len(errors), skipped=skipped, wall_s=time.perf_counter() - t0)
    _atomic_frame(result.summary(), out / "summary.csv")
    _atomic_write(out / "timing.json", json.dumps({"wall_s": result.wall_s, "workers": workers,
                                                    "executed": result.executed, "skipped": skipped}))
    return result


def _spec_dict(spec: GridSpec) -> dict[str, Any]:
    d = {"name": spec.name, "config": spec.config, "base": spec.base, "seeds": spec.seeds, "sft_seed": spec.sft_seed,
         "reference": spec.reference, "variants": spec.variants,
         "questions": {q: list(p) for q, p in spec.questions.items()}}
    if spec.worlds:
        d["worlds"] = {"levels": spec.worlds.levels, "variants": spec.worlds.variants, "seeds": spec.worlds.seeds,
                       "best_metric": spec.worlds.best_metric, "best_of": spec.worlds.best_of}
    return d


def collect(out_dir: str | Path, spec: GridSpec, *, worlds: Sequence[str] | None = None,
            return_per_query: bool = False) -> Any:
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
                world != BASE_WORLD and spec.worlds and seed not in spec.worlds.seeds):
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
        frame["_s"] = frame["stage"].map({"sft": 0, "rce": 1, "grpo": 2})
        frame = frame.sort_values(["_w", "_o", "seed", "split", "_s", "epoch"]).drop(columns=["_o", "_w", "_s"])
        frame = frame.reset_index(drop=True)
    if not return_per_query:
        return frame
    per_query = pd.concat(pq_frames, ignore_index=True) if pq_frames else pd.DataFrame()
    return frame, per_query


def best_variant(frame: pd.DataFrame, spec: GridSpec, metric: str | None = None) -> str:
    """The variant with the best mean final test ``metric`` on the base world, among ``worlds.best_of`` (default:
    every variant that runs GRPO, except the reference)."""
    metric = metric or (spec.worlds.best_metric if spec.worlds else "utility@1")
    candidates = (spec.worlds.best_of if spec.worlds and spec.worlds.best_of else
                  [v for v in spec.variants if v != spec.reference and spec.value(v, "grpo.epochs") > 0])
    final = frame[(frame["world"] == BASE_WORLD) & (frame["split"] == "test") & (frame["stage"] == "grpo")]
    means = final[final["variant"].isin(candidates)].groupby("variant")[metric].mean()
    if means.empty:
        raise GridError(f"no finished run among the @best candidates {candidates}")
    return str(means.idxmax() if METRIC_DIRECTION[metric] >= 0 else means.idxmin())


# --------------------------------------------------------------------------------------------------- statistics
@functools.lru_cache(maxsize=8)
def _two_level_draws(seed: int, n_boot: int, S: int, Q: int) -> tuple[np.ndarray, np.ndarray]:
    """The replicates' seed draws ``[n_boot, S]`` and query draw counts ``[n_boot, Q]``; cached because every
    (variant, metric) of a summary with the same shape uses the same draws (a pure function of its arguments)."""
    rng = np.random.default_rng(seed)
    s_idx = rng.integers(0, S, (n_boot, S))
    q_idx = rng.integers(0, Q, (n_boot, Q))
    flat = (np.arange(n_boot)[:, None] * Q + q_idx).ravel()
    counts = np.bincount(flat, minlength=n_boot * Q).reshape(n_boot, Q).astype(float)
    s_idx.flags.writeable = counts.flags.writeable = False
    return s_idx, counts


def bootstrap_mean_ci(x: np.ndarray, *, n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``x`` (1-D: resample its entries) or of the grand mean of ``x``
    (2-D ``[runs, queries]``: a two-level bootstrap, see :func:`summarize`).

    Exact recipe (tests replicate it): ``rng = np.random.default_rng(seed)``; 1-D:
    ``idx = rng.integers(0, n, (n_boot, n))``, statistic ``x[idx].mean(1)``; 2-D: ``s = rng.integers(0, S,
    (n_boot, S))`` then ``q = rng.integers(0, Q, (n_boot, Q))``, statistic ``mean_j mean_k x[s[b, j], q[b, k]]``;
    the interval is ``np.quantile(stats, [(1 - ci) / 2, (1 + ci) / 2])``.
    """
    x = np.asarray(x, dtype=float)
    lo_q, hi_q = (1 - ci) / 2, (1 + ci) / 2
    if x.size == 0:
        return math.nan, math.nan
    if x.ndim == 1:
        n = len(x)
        stats = x[np.random.default_rng(seed).integers(0, n, (n_boot, n))].mean(axis=1)
    elif x.ndim == 2:
        S, Q = x.shape
        s_idx, counts = _two_level_draws(seed, n_boot, S, Q)
        # per_run[s, b]: run s's mean over replicate b's query draw; then average replicate b's seed draw.
        per_run = (counts @ x.T).T / Q
        stats = per_run[s_idx, np.arange(n_boot)[:, None]].mean(axis=1)
    else:
        raise ValueError(f"x must be 1-D (runs) or 2-D (runs x queries), got shape {x.shape}")
    lo, hi = np.quantile(stats, [lo_q, hi_q])
    return float(lo), float(hi)


# A percentile bootstrap over a handful of runs is roughly [min, max] of the runs: on null differences with 3 seeds
# it calls ~24% of them significant. Seeds-only intervals therefore get a verdict only from this many runs on.
MIN_RUNS_FOR_SEEDS_ONLY_VERDICT = 10


def _verdict(lo: float, hi: float, direction: int, method: str = "seeds x queries", n_runs: int = 0) -> str:
    if not (np.isfinite(lo) and np.isfinite(hi)) or direction == 0:
        return ""
    if method == "seeds" and n_runs < MIN_RUNS_FOR_SEEDS_ONLY_VERDICT:
        return ""
    if lo > 0:
        return "better" if direction > 0 else "worse"
    if hi < 0:
        return "worse" if direction > 0 else "better"
    return "n.s."


class _PerQuery:
    """Per-query outcome matrices ``[seeds, queries]`` by (world, variant, stage, metric), built once."""

    def __init__(self, pq: pd.DataFrame | None) -> None:
        self.groups: dict[tuple[str, str, str], pd.DataFrame] = {}
        if pq is not None and not pq.empty:
            for key, grp in pq.groupby(["world", "variant", "stage"], sort=False):
                self.groups[key] = grp.set_index(["seed", "query"]).sort_index()
        self.cache: dict[tuple[str, str, str, str], pd.DataFrame | None] = {}

    def matrix(self, world: str, variant: str, stage: str, metric: str) -> pd.DataFrame | None:
        key = (world, variant, stage, metric)
        if key not in self.cache:
            grp = self.groups.get((world, variant, stage))
            mat = grp[metric].unstack("query") if grp is not None and metric in grp.columns else None
            if mat is not None:
                # Queries undefined for every run (ndcg@5 of all-equal rewards) carry nothing to compare.
                mat = mat.dropna(axis=1, how="all")
            self.cache[key] = mat if mat is not None and mat.size and mat.notna().all().all() else None
        return self.cache[key]


def _paired(pq: _PerQuery, final: pd.DataFrame, world: str, a: str, b: str | None, metric: str,
            ) -> tuple[np.ndarray, str]:
    """The paired difference ``a - b`` per run (b=None: a's own SFT), as [runs, queries] when per-query outcomes
    exist for the metric, else [runs]; and the name of the method."""
    a_mat = pq.matrix(world, a, "grpo", metric)
    b_mat = pq.matrix(world, a, "sft", metric) if b is None else pq.matrix(world, b, "grpo", metric)
    if a_mat is not None and b_mat is not None:
        seeds = a_mat.index.intersection(b_mat.index)
        if len(seeds):
            return (a_mat.loc[seeds] - b_mat.loc[seeds]).to_numpy(), "seeds x queries"
    fa = final[(final["world"] == world) & (final["variant"] == a)].set_index("seed")
    if b is None:
        return (fa[metric] - fa[f"sft_{metric}"]).dropna().to_numpy(), "seeds"
    fb = final[(final["world"] == world) & (final["variant"] == b)].set_index("seed")
    seeds = fa.index.intersection(fb.index)
    return (fa.loc[seeds, metric] - fb.loc[seeds, metric]).dropna().to_numpy(), "seeds"


def _final_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run: the final (after GRPO) test metrics plus ``sft_<metric>`` of the same run's SFT row."""
    test = frame[frame["split"] == "test"]
    keys = ["world", "variant", "seed"]
    final = test[test["stage"] == "grpo"].set_index(keys)
    sft = test[test["stage"] == "sft"].set_index(keys)
    metrics = [m for m in METRIC_DIRECTION if m in final.columns]
    out = final[metrics].join(sft[metrics].add_prefix("sft_"))
    return out.reset_index()


def summarize(
    frame: pd.DataFrame,
    per_query: pd.DataFrame | None = None,
    *,
    metrics: Sequence[str] | None = None,
    reference: str | None = None,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean and bootstrap CI of every final test metric per (world, variant), the paired difference to SFT with its
    CI and verdict, and (with ``reference``) the paired difference to the reference variant.

    Pairing: each run's final metric minus the *same* SFT checkpoint's metric (on the same test queries); against
    the reference, run seed ``k`` of the variant minus seed ``k`` of the reference (same batch-order seed).
    With ``per_query`` the CI is a two-level bootstrap (resample seeds, then test queries, shared across the
    drawn seeds because all runs of a world share the test set); without it (or for ``ndcg@5``) seeds only.
    ``verdict`` is ``better``/``worse`` when the CI excludes 0 (direction from :data:`METRIC_DIRECTION`),
    else ``n.s.``; a seeds-only CI from fewer than :data:`MIN_RUNS_FOR_SEEDS_ONLY_VERDICT` runs gets no verdict
    (``""``), because a percentile bootstrap over 3 runs is about [min, max] and calls noise significant.
    """
    final = _final_table(frame)
    metrics = [m for m in (metrics or METRIC_DIRECTION) if m in final.columns]
    pq = _PerQuery(per_query)
    rows = []
    for (world, variant), grp in final.groupby(["world", "variant"], sort=False):
        for m in metrics:
            d = METRIC_DIRECTION[m]
            vals, method = _paired(pq, final, world, variant, None, m)
            level = grp[m].to_numpy(dtype=float)
            level_mat = pq.matrix(world, variant, "grpo", m)
            level_ci = bootstrap_mean_ci(level_mat.to_numpy() if level_mat is not None else level,
                                         n_boot=n_boot, ci=ci, seed=seed)
            lo, hi = bootstrap_mean_ci(vals, n_boot=n_boot, ci=ci, seed=seed)
            row = {"world": world, "variant": variant, "metric": m, "n_seeds": len(grp), "mean": level.mean(),
                   "ci_low": level_ci[0], "ci_high": level_ci[1], "sft": grp[f"sft_{m}"].mean(),
                   "diff": float(np.mean(vals)) if np.size(vals) else math.nan, "diff_low": lo, "diff_high": hi,
                   "verdict": _verdict(lo, hi, d, method, len(vals)), "ci_method": method}
            if reference is not None:
                if variant == reference:
                    row.update(vs_ref=0.0, vs_ref_low=0.0, vs_ref_high=0.0, vs_ref_verdict="")
                elif (final["variant"] == reference).any():
                    rv, rmethod = _paired(pq, final, world, variant, reference, m)
                    rlo, rhi = bootstrap_mean_ci(rv, n_boot=n_boot, ci=ci, seed=seed)
                    row.update(vs_ref=float(np.mean(rv)) if np.size(rv) else math.nan, vs_ref_low=rlo,
                               vs_ref_high=rhi, vs_ref_verdict=_verdict(rlo, rhi, d, rmethod, len(rv)))
            rows.append(row)
    out = pd.DataFrame(rows)
    if reference is not None and not out.empty:
        out.attrs["reference"] = reference
    return out


def compare(frame: pd.DataFrame, per_query: pd.DataFrame | None, pairs: Mapping[str, tuple[str, str]], *,
            metrics: Sequence[str] = KEY_METRICS, world: str = BASE_WORLD, n_boot: int = 2000, ci: float = 0.95,
            seed: int = 0) -> pd.DataFrame:
    """Paired differences ``a - b`` (with CI and verdict) for named pairs of variants, e.g. the grid's questions."""
    final = _final_table(frame)
    pq = _PerQuery(per_query)
    rows = []
    for question, (a, b) in pairs.items():
        for m in metrics:
            if m not in final.columns:
                continue
            vals, method = _paired(pq, final, world, a, b, m)
            lo, hi = bootstrap_mean_ci(vals, n_boot=n_boot, ci=ci, seed=seed)
            rows.append({"question": question, "a": a, "b": b, "metric": m,
                         "diff": float(np.mean(vals)) if np.size(vals) else math.nan, "low": lo, "high": hi,
                         "verdict": _verdict(lo, hi, METRIC_DIRECTION[m], method, len(vals)),
                         "ci_method": method})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------- the verdict
def _fmt_diff(d: float, lo: float, hi: float) -> str:
    return f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def conclusions(
    summary: pd.DataFrame,
    *,
    metrics: Sequence[str] = KEY_METRICS,
    reference: str | None = None,
    world: str = BASE_WORLD,
    comparisons: pd.DataFrame | None = None,
    sft_variant: str | None = None,
) -> str:
    """A plain-text verdict generated from :func:`summarize`'s numbers (nothing hand-written that could go stale):
    which variants are significantly better/worse than SFT and than ``reference`` on each metric, the answers to
    the grid's questions, and, when the summary has several worlds, where the swept variants help or hurt.
    ``sft_variant`` (the variant that is SFT itself; default: the one whose difference to SFT is exactly 0 on every
    metric) is left out of the lists."""
    reference = reference or summary.attrs.get("reference")
    s = summary[(summary["world"] == world) & summary["metric"].isin(metrics)]
    if s.empty:
        return f"No results for world {world!r}."
    if sft_variant is None:  # a variant identical to SFT on every metric (no RCE, no GRPO) is the baseline itself
        same = s.groupby("variant")[["diff", "diff_low", "diff_high"]].apply(lambda g: bool((g == 0).all().all()))
        sft_variant = next(iter(same[same].index), None)
    n_seeds = int(s["n_seeds"].min())
    method = ", ".join(sorted(s["ci_method"].unique()))
    lines = [f"World '{world}': {s['variant'].nunique()} variants x {n_seeds}+ seeds; 95% bootstrap CIs over "
             f"{method}; 'better'/'worse' = the CI of the paired difference excludes 0."]
    n_tests = len(s)
    lines.append(f"({n_tests} variant x metric comparisons at 95%: expect about {0.05 * n_tests:.0f} "
                 "'significant' by chance; trust effects that are large or consistent across metrics.)")
    if reference is not None and reference in set(s["variant"]):
        ref = s[s["variant"] == reference].set_index("metric")
        parts = [f"{m} {ref.loc[m, 'mean']:.3f} vs SFT {ref.loc[m, 'sft']:.3f}: "
                 f"{_fmt_diff(ref.loc[m, 'diff'], ref.loc[m, 'diff_low'], ref.loc[m, 'diff_high'])} "
                 f"({ref.loc[m, 'verdict']})" for m in metrics if m in ref.index]
        lines.append(f"\nThe reference '{reference}' vs SFT: " + "; ".join(parts) + ".")
    s = s[s["variant"] != sft_variant]
    for m in metrics:
        sm = s[s["metric"] == m]
        if sm.empty:
            continue
        lines.append(f"\n{m}:")
        for label, verdict in (("better than SFT", "better"), ("worse than SFT", "worse")):
            hit = sm[sm["verdict"] == verdict].sort_values("diff", ascending=verdict == "worse")
            items = ", ".join(f"{r.variant} {_fmt_diff(r.diff, r.diff_low, r.diff_high)}" for r in hit.itertuples())
            lines.append(f"  significantly {label}: {items or 'none'}")
        if reference is not None and "vs_ref_verdict" in sm.columns:
            for label, verdict in (("better", "better"), ("worse", "worse")):
                hit = sm[sm["vs_ref_verdict"] == verdict].sort_values("vs_ref", ascending=verdict == "worse")
                items = ", ".join(f"{r.variant} {_fmt_diff(r.vs_ref, r.vs_ref_low, r.vs_ref_high)}"
                                  for r in hit.itertuples())
                lines.append(f"  significantly {label} than '{reference}': {items or 'none'}")
        d = METRIC_DIRECTION[m]
        top = sm.sort_values("diff", ascending=d < 0).iloc[0]
        lines.append(f"  best mean: {top.variant} ({top['mean']:.3f}, vs SFT "
                     f"{_fmt_diff(top['diff'], top.diff_low, top.diff_high)}, {top.verdict})")
    if comparisons is not None and not comparisons.empty:
        lines.append("\nQuestions (paired difference a - b):")
        for q, grp in comparisons.groupby("question", sort=False):
            a, b = grp.iloc[0]["a"], grp.iloc[0]["b"]
            parts = [f"{r.metric} {_fmt_diff(r.diff, r.low, r.high)} {r.verdict}" for r in grp.itertuples()]
            lines.append(f"  {q} ({a} - {b}): " + "; ".join(parts))
    others = [w for w in summary["world"].unique() if w != world]
    if others:
        swept = list(dict.fromkeys(summary[summary["world"].isin(others)]["variant"]))
        lines.append(f"\nAcross worlds (difference to each world's own SFT) for {', '.join(swept)}:")
        sw = summary[summary["metric"].isin(metrics) & summary["variant"].isin(swept)]
        for w in [world, *others]:
            for v, grp in sw[sw["world"] == w].groupby("variant", sort=False):
                parts = [f"{r.metric} {_fmt_diff(r.diff, r.diff_low, r.diff_high)} {r.verdict}"
                         for r in grp.itertuples()]
                lines.append(f"  {w} / {v}: " + "; ".join(parts))
    return "\n".join(lines)


def format_summary(summary: pd.DataFrame, metrics: Sequence[str] = KEY_METRICS, world: str | None = None) -> str:
    """A compact text table: per variant and metric, mean and the difference to SFT with its CI and verdict."""
    s = summary[summary["metric"].isin(metrics)]
    if world is not None:
        s = s[s["world"] == world]
    cells = s.assign(cell=[f"{r['mean']:.3f} {_fmt_diff(r['diff'], r['diff_low'], r['diff_high'])} {r['verdict']}"
                           for _, r in s.iterrows()])
    table = cells.pivot_table(index=["world", "variant"], columns="metric", values="cell", aggfunc="first",
                              sort=False)
    table = table[[m for m in metrics if m in table.columns]]
    with pd.option_context("display.width", 250, "display.max_colwidth", 60, "display.max_rows", 500):
        return "mean, difference to SFT [95% CI], verdict\n" + table.to_string()


# --------------------------------------------------------------------------------------------------- CLI
def cmd_ablate(args: argparse.Namespace) -> int:
    spec = load_grid(args.grid, args.set or [])
    res = run_grid(spec, args.out, workers=args.workers, progress=not args.no_progress,
                   keep_checkpoints=args.keep_checkpoints)
    summary = res.summary()
    print(f"\n{res.executed} run(s) executed, {res.skipped} skipped (already done) in {res.wall_s:.0f} s; "
          f"results in {res.out_dir}")
    print(format_summary(summary))
    comparisons = compare(res.frame, res.per_query, spec.questions) if spec.questions else None
    print("\n" + conclusions(summary, reference=spec.reference, comparisons=comparisons))
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("ablate", help="run a grid of variants x seeds from one SFT checkpoint; print the "
                                             "summary with bootstrap CIs")
    p.add_argument("--grid", required=True, help="grid YAML (e.g. configs/ablate_default.yaml)")
    p.add_argument("--out", help="output directory (default: runs/ablate/<grid name>)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (one torch thread each)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override added to the grid's base")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep every run's per-epoch checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_ablate)
