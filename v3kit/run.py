"""One run, in one readable place: :class:`Run` is built from a :class:`~v3kit.config.RunConfig` and resolves, once,
what every stage needs (the data and its splits, the de-biased training splits, the runtime: device, precision,
threads, and the run context); then each stage is one call: ``sft()``, ``stage1()``, ``rce()``, ``grpo(**overrides)``
and ``select()``, each returning its stage result.

``v3kit run`` (:func:`v3kit.pipeline.run_pipeline`, which adds the run dir's lock, the trackers and the resume
checks), the notebooks' stage reuse (:mod:`v3kit.stage_reuse`), the GRPO panel and the grid worker all drive their
stages through it, so a new stage option is one edit here. The functions below are its parts (each rule, such as
the split seed or how the runtime is resolved, has one home).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from torch import nn

from .config import ConfigError, RunConfig
from .data.cache import cached_splits
from .data.contract import GroupData, Splits, split_by_query
from .data.debias import DebiasReport, debias_splits
from .data.long_frame import from_long_frame, to_long_frame
from .data.shared_candidates import with_candidate_table
from .data.stdlib_search import builtin_table
from .data.synthetic import make_world
from .data.tables import load_groups, read_table
from .data.text import default_cache_dir, embed_texts
from .train.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from .train.device import Runtime, resolve_device, resolve_precision, resolve_threads
from .train.grpo import run_grpo
from .train.metrics import evaluate
from .train.metrics_log import MetricsLog, read_metrics_frame
from .train.model import ModelConfig
from .train.model_size import count_params
from .train.rce import final_logit_temperature, run_rce
from .train.selection import Selection, select_model
from .train.sft import Stage1, load_sft, train_sft
from .train.training import StageResult


def sft_select_metric(cfg: RunConfig) -> str | None:
    """The val metric SFT keeps its best epoch on (its start included): ``select_metric`` under ``select:
    best_val``, else None (SFT ships its last epoch)."""
    return cfg.select_metric if cfg.select == "best_val" else None


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
    :func:`split_seed`; the candidates shared across groups as a table, per ``cfg.candidate_table``."""
    d = cfg.data
    if d.path and d.cache and d.text_mode != "end_to_end" and not d.path.startswith("builtin:"):
        # memory-mapped splits of a feature table: memory holds what the batches touch
        splits = cached_splits(
            d.path, d.feature_dtype, val_frac=d.val_frac, test_frac=d.test_frac, seed=split_seed(cfg)
        )
        mode = cfg.candidate_table
        return Splits(**{k: with_candidate_table(getattr(splits, k), mode) for k in ("train", "val", "test")})
    data = with_candidate_table(load_data(cfg, expect_dims=expect_dims), cfg.candidate_table)
    return split_by_query(data, val_frac=cfg.data.val_frac, test_frac=cfg.data.test_frac, seed=split_seed(cfg))


def training_splits(cfg: RunConfig, splits: Splits) -> tuple[Splits, DebiasReport | None]:
    """The splits RCE and GRPO train on: the training rewards de-biased per ``cfg.reward`` (val and test untouched),
    and what the de-biasing did (None for ``reward.debias: none``). One home for ``v3kit run``, the notebooks and
    the GRPO panel."""
    return debias_splits(splits, cfg.reward, seed=cfg.seed)


def split_seed(cfg: RunConfig) -> int:
    """The seed of ``cfg``'s train/val/test split: ``data.split_seed``, else the run's ``seed``."""
    return cfg.seed if cfg.data.split_seed is None else cfg.data.split_seed


def resolve_runtime(cfg: RunConfig, splits: Splits, *, warn: bool = True) -> Runtime:
    """Device, precision and thread count ``cfg`` asks for on this machine; a missing device is a ConfigError."""
    try:
        device = resolve_device(cfg.device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    threads = resolve_threads(
        cfg.threads, device, count_params(cfg.model, splits.train.query_dim, splits.train.cand_dim)
    )
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


def grpo_temperature(cfg: RunConfig, model_config: ModelConfig) -> float:
    """GRPO's logit temperature: ``grpo.logp_temperature``, where ``same_as_rce_end`` follows RCE's schedule."""
    return cfg.grpo.resolve_temperature(final_logit_temperature(cfg.rce, model_config.sim_temperature))


def last_stage(cfg: RunConfig) -> str:
    """The last stage that trains under ``cfg`` (``sft`` when RCE and GRPO are off)."""
    return "grpo" if cfg.grpo.epochs > 0 else "rce" if cfg.rce.epochs > 0 else "sft"


class Run:
    """A run of ``cfg``: the data, the splits and the runtime are resolved here, once (``splits``: already prepared
    ones; ``expect_dims``: see :func:`load_data`); the de-biased training splits on first use. ``callbacks`` and
    ``resume`` are the defaults of every stage call. Torch's CPU threads are set by :meth:`use_threads`."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        splits: Splits | None = None,
        expect_dims: tuple[int, int, str] | None = None,
        callbacks: Sequence[Any] = (),
        resume: bool = False,
        warn: bool = True,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.splits = splits if splits is not None else prepare_data(cfg, expect_dims=expect_dims)
        self.runtime = resolve_runtime(cfg, self.splits, warn=warn)
        self.callbacks = list(callbacks)
        self.resume = resume
        self._training: tuple[Splits, DebiasReport | None] | None = None
        self._log: MetricsLog | None = None

    # ---- what every stage gets
    def use_threads(self) -> None:
        """Set torch's CPU threads to the config's (``threads``), for the rest of the process, as a run does."""
        torch.set_num_threads(self.runtime.threads)

    @property
    def training_splits(self) -> Splits:
        """The splits RCE and GRPO train on: the training rewards de-biased per ``cfg.reward`` (see
        :func:`training_splits`), computed on first use."""
        if self._training is None:
            self._training = training_splits(self.cfg, self.splits)
        return self._training[0]

    @property
    def debias(self) -> DebiasReport | None:
        """What ``reward.debias`` did to the training rewards (None for ``none``)."""
        _ = self.training_splits
        return self._training[1] if self._training else None

    def context(self, **overrides: Any) -> dict[str, Any]:
        """The run context of a stage (:func:`run_context`); ``overrides``: any of its fields (seed, run_dir,
        resume, callbacks, progress, device, precision, log_every)."""
        ctx = run_context(self.cfg, self.runtime, callbacks=self.callbacks, resume=self.resume, run_dir=self.run_dir)
        other = overrides.get("run_dir", ctx["run_dir"])
        elsewhere = other is None or Path(other) != Path(ctx["run_dir"])
        if "metrics_log" not in overrides and not elsewhere:  # a stage writing elsewhere reads that dir's file
            if self._log is None:  # one log for all the run's stages (RunContext.metrics_log)
                self._log = MetricsLog(self.run_dir)
            ctx["metrics_log"] = self._log
        return {**ctx, **overrides}

    # ---- the stages
    def sft(self, **context: Any) -> StageResult:
        """Stage 0: train the supervised ranker on the splits; writes ``sft.pt`` in the run dir."""
        return train_sft(
            self.splits,
            self.cfg.model,
            self.cfg.sft,
            select_metric=sft_select_metric(self.cfg),
            **self.context(**context),
        )

    def ensure_sft(self) -> Path:
        """The run dir's ``sft.pt``: with ``resume`` an existing one is reused and an interrupted SFT continues from
        its newest ``sft_epoch{N}.pt``; without, SFT is trained afresh."""
        path = self.run_dir / "sft.pt"
        if not (self.resume and path.exists()):
            self.sft()
        return path

    def stage1(self, sft_checkpoint: str | Path | None = None) -> Stage1:
        """Stage 1: the policy, its frozen reference and ``old_log_probs`` from ``sft_checkpoint`` (default: the run
        dir's ``sft.pt``), on the run's device."""
        path = self.run_dir / "sft.pt" if sft_checkpoint is None else sft_checkpoint
        return load_sft(path, self.splits.train, device=self.runtime.device, precision=self.runtime.precision)

    def rce(self, stage1: Stage1, **context: Any) -> StageResult:
        """Stage 2: RCE on ``stage1.policy`` (in place) over the training splits."""
        return run_rce(
            stage1.policy,
            self.training_splits,
            self.cfg.rce,
            model_config=stage1.model_config,
            reference=stage1.reference,
            **self.context(**context),
        )

    def grpo(
        self,
        stage1: Stage1,
        *,
        policy: nn.Module | None = None,
        context: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> StageResult:
        """Stage 3: GRPO on ``policy`` (default ``stage1.policy``; trained in place) with ``cfg.grpo`` and the
        ``overrides`` of its keys (``kl_beta=0.01``: validated like the config); ``context``: run context fields."""
        cfg = dataclasses.replace(self.cfg.grpo, **overrides) if overrides else self.cfg.grpo
        return run_grpo(
            stage1.policy if policy is None else policy,
            self.training_splits,
            stage1.old_log_probs,
            cfg,
            reference=stage1.reference,
            temperature=grpo_temperature(self.cfg, stage1.model_config),
            model_config=stage1.model_config,
            **self.context(**(context or {})),
        )

    def select(self, models: dict[str, nn.Module]) -> tuple[Selection, nn.Module]:
        """The model ``cfg.select`` ships (see :mod:`v3kit.train.selection`), read from the run dir's
        ``metrics.csv`` and checkpoints, and its :class:`Selection`. ``models``: the trained ``sft``, ``rce`` and
        ``grpo`` models in memory (the end of the last stage is not loaded again)."""
        metric, run_dir = self.cfg.select_metric, self.run_dir
        metrics = (
            read_metrics_frame(run_dir / "metrics.csv")
            if (run_dir / "metrics.csv").is_file()
            else pd.DataFrame(columns=["stage", "split", "epoch"])
        )

        def sft_val() -> float:
            return float(
                evaluate(models["sft"], self.splits.val, temperature=1.0, precision=self.runtime.precision)[metric]
            )

        stage = last_stage(self.cfg)
        sel = select_model(run_dir, metrics, metric, self.cfg.select, stage, sft_val)
        if sel.stage == "sft":
            model = models["sft"]
        elif sel.stage == stage and sel.epoch == getattr(self.cfg, stage).epochs:
            model = models[stage]  # the end of the last stage: already in memory
        else:
            model = model_from_checkpoint(load_checkpoint(sel.checkpoint), sel.checkpoint).to(self.runtime.device)
        return sel, model
