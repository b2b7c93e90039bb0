"""What a run resolves once, before any stage trains: its data and splits, the de-biased training splits, the
runtime (device, precision, threads) and the run context every stage runner gets.

The pipeline (:mod:`v3kit.pipeline`), the notebooks' stage reuse (:mod:`v3kit.stage_reuse`), the GRPO panel and the
grids all build on these, so each rule (the split seed, where the data comes from, how the runtime is resolved) has
one home.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch

from .config import ConfigError, RunConfig
from .data.cache import cached_splits
from .data.contract import GroupData, Splits, split_by_query
from .data.debias import DebiasReport, debias_splits
from .data.long_frame import from_long_frame, to_long_frame
from .data.stdlib_search import builtin_table
from .data.synthetic import make_world
from .data.tables import load_groups, read_table
from .data.text import default_cache_dir, embed_texts
from .train.checkpoint import CheckpointError
from .train.device import Runtime, resolve_device, resolve_precision, resolve_threads
from .train.model_size import count_params


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
