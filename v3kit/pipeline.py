"""The whole v3 pipeline in one call: data -> SFT (or a given v2 checkpoint) -> stage 1 -> RCE -> GRPO."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from . import trackers
from .bounds import check_model_fits
from .config import ConfigError, RunConfig, dump_config, load_config, to_dict
from .data.contract import GroupData, Splits, split_by_query
from .data.debias import DebiasReport, check_debias, debias_splits
from .data.long_frame import from_long_frame, to_long_frame
from .data.stdlib_search import builtin_table
from .data.synthetic import make_world
from .data.tables import load_groups, read_table
from .data.text import default_cache_dir, embed_texts
from .provenance import NOT_EXPERIMENT_KEYS, config_changes, flatten
from .run_info import (  # noqa: F401 - re-exported: the pipeline's documented run-info helpers
    OWN_SFT,
    RUN_INFO,
    _check_same_sft,
    read_run_info,
    record_sft_checkpoint,
    recorded_sft_checkpoint,
    recorded_split_seed,
    update_run_info,
)
from .rundir import RunLock, atomic_write_text
from .train import distributed
from .train.checkpoint import (
    CheckpointError,
    check_finite_checkpoint,
    checkpoint_model_config,
    load_checkpoint,
    model_from_checkpoint,
)
from .train.device import Runtime, resolve_device, resolve_precision, resolve_threads
from .train.grpo import run_grpo
from .train.metrics import evaluate, metric_order
from .train.model import build_model, compute_log_probs
from .train.rce import final_logit_temperature, run_rce
from .train.selection import Selection, select_model, write_selection
from .train.sft import Stage1, load_sft, train_sft
from .train.training import StageResult


def _cache_dir(cfg: RunConfig) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()


def load_table(cfg: RunConfig) -> pd.DataFrame:
    """The long-form table of ``cfg.data`` as read (one row per query-candidate pair, before validation and
    embedding): a built-in table (built and cached on first use), a file, or the synthetic world exported."""
    d = cfg.data
    if not d.path:
        return to_long_frame(make_world(d.synthetic))
    if d.path == "builtin:stdlib_search":
        return builtin_table(d.stdlib_search, _cache_dir(cfg) / "tables")
    return read_table(d.path)


def load_data(cfg: RunConfig, *, expect_dims: tuple[int, int, str] | None = None) -> GroupData:
    """All groups of ``cfg.data``: the synthetic world, a built-in table, or a file; text columns without feature
    vectors are embedded with ``data.text_encoder`` (cached) unless ``data.text_mode`` is ``end_to_end``.

    ``expect_dims``: ``(query_dim, cand_dim, checkpoint)`` of a checkpoint that will score the data; the encoder's
    dim is checked on one text first, so a mismatch is reported before every text is embedded."""
    d = cfg.data
    if not d.path:
        return make_world(d.synthetic)
    cache = _cache_dir(cfg)

    def embed_some(texts: list[str]):
        return embed_texts(
            texts,
            encoder_name=d.text_encoder,
            max_tokens=d.text_max_tokens,
            cache_dir=cache / "embeddings",
            progress=cfg.progress,
        )

    def embed(texts: list[str]):
        if expect_dims is not None and len(texts) > 1:
            dim = int(embed_some(texts[:1]).shape[1])
            if dim not in expect_dims[:2]:
                raise CheckpointError(
                    f"checkpoint {expect_dims[2]} takes features of dim (query {expect_dims[0]}, candidate "
                    f"{expect_dims[1]}) but data.text_encoder {d.text_encoder!r} gives {dim}-dim embeddings (checked "
                    f"on one text before embedding all {len(texts)}); use the encoder the checkpoint was trained "
                    "with, or import it again for these features"
                )
        return embed_some(texts)

    if d.path == "builtin:stdlib_search":
        return from_long_frame(load_table(cfg), embed=embed, text_mode=d.text_mode)
    return load_groups(d.path, embed=embed, text_mode=d.text_mode, feature_dtype=d.feature_dtype)


def prepare_data(cfg: RunConfig, *, expect_dims: tuple[int, int, str] | None = None) -> Splits:
    """Load ``cfg.data`` (see :func:`load_data`, also for ``expect_dims``) and split it by query with
    :func:`split_seed`."""
    d = cfg.data
    if d.path and d.cache and d.text_mode != "end_to_end" and not d.path.startswith("builtin:"):
        # memory-mapped splits of a feature table: memory holds what the batches touch
        from .data.cache import cached_splits

        return cached_splits(d.path, d.feature_dtype, val_frac=d.val_frac, test_frac=d.test_frac, seed=split_seed(cfg))
    data = load_data(cfg, expect_dims=expect_dims)
    return split_by_query(data, val_frac=cfg.data.val_frac, test_frac=cfg.data.test_frac, seed=split_seed(cfg))


def training_splits(cfg: RunConfig, splits: Splits) -> tuple[Splits, DebiasReport | None]:
    """The splits RCE and GRPO train on: the training rewards de-biased per ``cfg.reward`` (val and test untouched),
    and what the de-biasing did (None for ``reward.debias: none``). One home for ``v3kit run``, the notebooks and
    the GRPO panel."""
    return debias_splits(splits, cfg.reward, seed=cfg.seed)


def split_seed(cfg: RunConfig) -> int:
    """The seed of ``cfg``'s train/val/test split: ``data.split_seed``, else the run's ``seed``."""
    return cfg.seed if cfg.data.split_seed is None else cfg.data.split_seed


def _count_params(cfg: RunConfig, splits: Splits) -> int | None:
    """Parameters of the configured model, built on the meta device (no memory, no draw from torch's RNG)."""
    rng = torch.get_rng_state()
    try:
        with torch.device("meta"):
            model = build_model(cfg.model, splits.train.query_dim, splits.train.cand_dim)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # a custom model that cannot be built on meta: no size hint, auto treats it as large
        return None
    finally:
        torch.set_rng_state(rng)


def resolve_runtime(cfg: RunConfig, splits: Splits, *, warn: bool = True) -> Runtime:
    """Device, precision and thread count ``cfg`` asks for on this machine; a missing device is a ConfigError."""
    try:
        device = resolve_device(cfg.device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    threads = resolve_threads(cfg.threads, device, _count_params(cfg, splits))
    return Runtime(
        device=device,
        precision=resolve_precision(cfg.precision, device, warn=warn),
        threads=threads,
        requested_precision=cfg.precision,
    )


def run_context(
    cfg: RunConfig,
    runtime: Runtime,
    *,
    callbacks: Sequence[Any] = (),
    resume: bool = False,
    run_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The :class:`v3kit.train.training.RunContext` fields every stage runner gets from ``cfg`` (as keyword arguments):
    the one place a run context is built, by ``v3kit run``, the notebooks, the GRPO panel and the grids alike."""
    return dict(
        seed=cfg.seed,
        run_dir=cfg.run_dir if run_dir is None else run_dir,
        resume=resume,
        callbacks=callbacks,
        progress=cfg.progress,
        device=runtime.device,
        precision=runtime.precision,
        log_every=cfg.log_every,
    )


def stage_options(cfg: RunConfig, splits: Splits) -> dict[str, Any]:
    """The machine-dependent part of :func:`run_context` (``device``, ``precision``, ``log_every``) for code that
    calls a stage runner with its own seed and callbacks (notebook 03, the GRPO panel); also sets torch's CPU
    threads (``cfg.threads``) for the process, as a run does, so the config's device and threads hold there too."""
    runtime = resolve_runtime(cfg, splits)
    torch.set_num_threads(runtime.threads)
    ctx = run_context(cfg, runtime)
    return {k: ctx[k] for k in ("device", "precision", "log_every")}


def sft_select_metric(cfg: RunConfig) -> str | None:
    """The val metric SFT keeps its best epoch on (its start included): ``select_metric`` under ``select:
    best_val``, else None (SFT ships its last epoch)."""
    return cfg.select_metric if cfg.select == "best_val" else None


def ensure_sft(
    cfg: RunConfig,
    splits: Splits,
    *,
    callbacks: Sequence[Any] = (),
    resume: bool = True,
    runtime: Runtime | None = None,
) -> Path:
    """Path of the run's ``sft.pt``: with ``resume`` an existing one is reused and an interrupted SFT continues
    from its newest ``sft_epoch{N}.pt``; without, SFT is trained afresh."""
    path = Path(cfg.run_dir) / "sft.pt"
    runtime = runtime or resolve_runtime(cfg, splits)
    if not (resume and path.exists()):
        train_sft(
            splits,
            cfg.model,
            cfg.sft,
            select_metric=sft_select_metric(cfg),
            **run_context(cfg, runtime, callbacks=callbacks, resume=resume),
        )
    return path


# What a resumed run may change: GRPO is the last stage, so more GRPO epochs extend it without invalidating
# anything. Every other change (data, model, SFT, RCE, seed) would make the saved checkpoints belong to
# another experiment, and RCE's temperature schedule depends on its total number of steps.
# The keys that are not part of the experiment (provenance.NOT_EXPERIMENT_KEYS) may change too.
# What to do on a NaN/inf batch is a policy for the steps still to come, not part of what was trained.
RESUMABLE_CHANGES = (*NOT_EXPERIMENT_KEYS, "grpo.epochs", "sft.on_nonfinite", "rce.on_nonfinite", "grpo.on_nonfinite")


def check_resumable(cfg: RunConfig, run_dir: str | Path) -> None:
    """Refuse to resume ``run_dir`` under a config that differs from the one it was started with."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return
    try:
        old = to_dict(load_config(path))
    except ConfigError as e:
        raise ConfigError(f"cannot resume {run_dir}: its config.yaml is not valid for this v3kit ({e})") from None
    details = config_changes(flatten(old), flatten(to_dict(cfg)), RESUMABLE_CHANGES)
    if details:
        raise ConfigError(
            f"cannot resume {run_dir} under another config ({details}); only {list(RESUMABLE_CHANGES)} "
            "may change on --resume: use a new run_dir, or drop --resume to start over"
        )


def stage_table(
    models: dict[str, nn.Module],
    data: GroupData,
    reference: nn.Module,
    temperature: float,
    *,
    precision: str = "fp32",
    baselines: bool = False,
) -> pd.DataFrame:
    """One row per stage of held-out metrics, columns in :data:`METRIC_NAMES` order; ``baselines`` appends the
    trivial rankers of :mod:`v3kit.train.baselines` (random, raw cosine, reward oracle) for context.

    Every stage is scored at the same ``temperature`` (the model's ``sim_temperature``), so ``entropy`` and
    ``kl_to_sft`` compare like with like even when GRPO trained at another logit temperature; the per-epoch curves
    in ``metrics.csv`` use each stage's own temperature. Ranking metrics do not depend on it.
    """
    ref_logp = compute_log_probs(reference, data, temperature, precision=precision)  # once for every stage
    scored: dict[int, dict[str, float]] = {}  # one evaluation per model: 'selected' is often another row's model
    for m in models.values():
        if id(m) not in scored:
            scored[id(m)] = evaluate(
                m, data, temperature=temperature, reference=reference, ref_logp=ref_logp, precision=precision
            )
    rows = {name: dict(scored[id(m)]) for name, m in models.items()}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "stage"
    if baselines:
        from .train.baselines import baseline_table

        table = pd.concat([table, baseline_table(data)])
    return table[metric_order(table.columns)]


@dataclass
class PipelineResult:
    run_dir: Path
    splits: Splits
    stage1: Stage1
    rce: StageResult
    grpo: StageResult
    table: pd.DataFrame  # rows sft / rce / grpo, held-out test metrics
    models: dict[str, nn.Module] = field(default_factory=dict)  # on runtime.device
    runtime: Runtime | None = None
    # batches left out for a NaN/inf loss or gradient, per stage run with on_nonfinite=skip_batch
    skipped_batches: dict[str, int] = field(default_factory=dict)
    selection: Selection | None = None  # which model the run ships (the table's ``selected`` row)
    debias: DebiasReport | None = None  # what reward.debias did to the training rewards


def skipped_batches(run_dir: str | Path) -> dict[str, int]:
    """Per stage, the batches ``on_nonfinite=skip_batch`` skipped (the ``skipped_nonfinite`` column's sum)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        return {}
    df = pd.read_csv(path)
    if "skipped_nonfinite" not in df.columns:
        return {}
    df = df[df["skipped_nonfinite"].notna()]
    return {str(k): int(v) for k, v in df.groupby("stage", sort=False)["skipped_nonfinite"].sum().items()}


def run_pipeline(
    cfg: RunConfig,
    *,
    sft_checkpoint: str | Path | None = None,
    splits: Splits | None = None,
    callbacks: Sequence[Any] = (),
    resume: bool = False,
    tracking: Mapping[str, Any] | None = None,
) -> PipelineResult:
    """Run SFT (unless ``sft_checkpoint``) -> stage 1 -> RCE -> GRPO in ``cfg.run_dir``; return the stage table.

    ``cfg.device`` / ``cfg.precision`` / ``cfg.threads`` are resolved first (:func:`resolve_runtime`); the
    thread count is set with ``torch.set_num_threads`` for the rest of the process. Holds ``run_dir``'s writer
    lock throughout (a second concurrent run there is refused, naming this PID). ``cfg.report_to``'s trackers see
    every logged row and the stage table (``tracking``: their tags and default store, see
    :func:`v3kit.trackers.start`).
    """
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir {run_dir} is a file, not a directory; set run_dir to a directory path")
    sft_checkpoint = sft_checkpoint or cfg.sft.checkpoint
    if sft_checkpoint and not Path(sft_checkpoint).is_file():
        raise ConfigError(
            f"sft.checkpoint / --sft {sft_checkpoint} does not exist; give the path of a v2 SFT "
            "checkpoint (v3kit import-sft makes one from your own model)"
        )
    if sft_checkpoint:
        # The given checkpoint's model is what runs, whatever cfg.model says: record that one in config.yaml.
        ckpt = load_checkpoint(sft_checkpoint)
        check_finite_checkpoint(ckpt, sft_checkpoint)  # before anything is written: refuse NaN/inf weights
        cfg = dataclasses.replace(cfg, model=checkpoint_model_config(ckpt, sft_checkpoint))
    run_dir.mkdir(parents=True, exist_ok=True)
    # Under torchrun rank 0 is the run dir's one writer (the other ranks write nothing) and its one reporter.
    main = distributed.current().main
    with RunLock(run_dir) if main else contextlib.nullcontext():
        with trackers.reporting(cfg, run_dir, resume=resume, tracking=tracking, active=main) as reporter:
            result = _run_locked(
                cfg,
                run_dir,
                sft_checkpoint=sft_checkpoint,
                splits=splits,
                callbacks=[*callbacks, *reporter.callbacks()],
                resume=resume,
            )
            reporter.finish(result.table, run_dir)
            return result


def _run_locked(
    cfg: RunConfig,
    run_dir: Path,
    *,
    sft_checkpoint: str | Path | None,
    splits: Splits | None,
    callbacks: Sequence[Any],
    resume: bool,
) -> PipelineResult:
    recorded = None
    if resume:
        check_resumable(cfg, run_dir)
        recorded = _check_same_sft(run_dir, sft_checkpoint)
    splits = splits or prepare_data(cfg)
    runtime = resolve_runtime(cfg, splits)  # before anything is written: a missing device fails cleanly
    check_model_fits(cfg.model, splits.train.query_dim, splits.train.cand_dim, runtime.device)  # a model too big
    check_debias(cfg.reward, splits.train)  # before SFT: data that cannot support it fails in one line now
    if cfg.select_metric == "utility@1" and splits.val.utility is None:
        raise ConfigError(
            "select_metric=utility@1 needs a true utility, which this data does not have; use a label "
            "metric such as select_metric=acc@1"
        )
    torch.set_num_threads(runtime.threads)
    main = distributed.current().main
    if main:
        dump_config(cfg, run_dir / "config.yaml")
    sft_path = (
        Path(sft_checkpoint)
        if sft_checkpoint
        else ensure_sft(cfg, splits, callbacks=callbacks, resume=resume, runtime=runtime)
    )
    if main:
        record_sft_checkpoint(run_dir, sft_path, given=bool(sft_checkpoint), recorded=recorded)
    distributed.barrier()

    on = dict(device=runtime.device, precision=runtime.precision)
    stage1 = load_sft(sft_path, splits.train, **on)
    model_cfg = stage1.model_config
    rl_splits, debias = training_splits(cfg, splits)
    if debias is not None and main:
        update_run_info(run_dir, **debias.as_dict())
    common = run_context(cfg, runtime, callbacks=callbacks, resume=resume, run_dir=run_dir)
    rce = run_rce(stage1.policy, rl_splits, cfg.rce, model_config=model_cfg, reference=stage1.reference, **common)
    after_rce = copy.deepcopy(stage1.policy)
    temperature = cfg.grpo.resolve_temperature(final_logit_temperature(cfg.rce, model_cfg.sim_temperature))
    grpo = run_grpo(
        stage1.policy,
        rl_splits,
        stage1.old_log_probs,
        cfg.grpo,
        reference=stage1.reference,
        temperature=temperature,
        model_config=model_cfg,
        **common,
    )

    models = {"sft": stage1.reference, "rce": after_rce, "grpo": stage1.policy}
    distributed.barrier()  # rank 0's metrics.csv is complete
    selection, models["selected"] = _select(cfg, run_dir, models, splits, runtime)
    table = stage_table(models, splits.test, stage1.reference, model_cfg.sim_temperature, precision=runtime.precision)
    if main:
        atomic_write_text(run_dir / "summary.csv", table.to_csv())
        write_selection(run_dir, selection)
    distributed.barrier()
    return PipelineResult(
        run_dir=run_dir,
        splits=splits,
        stage1=stage1,
        rce=rce,
        grpo=grpo,
        table=table,
        models=models,
        runtime=runtime,
        skipped_batches=skipped_batches(run_dir),
        selection=selection,
        debias=debias,
    )


def last_stage(cfg: RunConfig) -> str:
    """The last stage that trains under ``cfg`` (``sft`` when RCE and GRPO are off)."""
    return "grpo" if cfg.grpo.epochs > 0 else "rce" if cfg.rce.epochs > 0 else "sft"


def _select(
    cfg: RunConfig, run_dir: Path, models: dict[str, nn.Module], splits: Splits, runtime: Runtime
) -> tuple[Selection, nn.Module]:
    """The model ``cfg.select`` ships (see :mod:`v3kit.train.selection`) and its :class:`Selection`."""
    metric = cfg.select_metric
    metrics = (
        pd.read_csv(run_dir / "metrics.csv")
        if (run_dir / "metrics.csv").is_file()
        else pd.DataFrame(columns=["stage", "split", "epoch"])
    )

    def sft_val() -> float:
        return float(evaluate(models["sft"], splits.val, temperature=1.0, precision=runtime.precision)[metric])

    stage = last_stage(cfg)
    sel = select_model(run_dir, metrics, metric, cfg.select, stage, sft_val)
    if sel.stage == "sft":
        model = models["sft"]
    elif sel.stage == stage and sel.epoch == getattr(cfg, stage).epochs:
        model = models[stage]  # the end of the last stage: already in memory
    else:
        model = model_from_checkpoint(load_checkpoint(sel.checkpoint), sel.checkpoint).to(runtime.device)
    return sel, model
