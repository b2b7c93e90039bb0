"""The whole v3 pipeline in one call: data -> SFT (or a given v2 checkpoint) -> stage 1 -> RCE -> GRPO."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from torch import nn

from .config import ConfigError, RunConfig, dump_config, load_config, to_dict
from .data import GroupData, Splits, from_long_frame, read_table, split_by_query
from .grpo import run_grpo
from .metrics import METRIC_NAMES, evaluate
from .rce import final_logit_temperature, run_rce
from .sft import Stage1, load_sft, train_sft
from .stdlib_search import builtin_table
from .synthetic import make_world
from .text import default_cache_dir, embed_texts
from .training import StageResult, config_changes


def load_data(cfg: RunConfig) -> GroupData:
    """All groups of ``cfg.data``: the synthetic world, a built-in table, or a file; text columns without feature
    vectors are embedded with ``data.text_encoder`` (cached) unless ``data.text_mode`` is ``end_to_end``."""
    d = cfg.data
    if not d.path:
        return make_world(d.synthetic)
    cache = Path(d.cache_dir) if d.cache_dir else default_cache_dir()

    def embed(texts: list[str]):
        return embed_texts(texts, encoder_name=d.text_encoder, max_tokens=d.text_max_tokens,
                           cache_dir=cache / "embeddings", progress=cfg.progress)

    if d.path == "builtin:stdlib_search":
        frame = builtin_table(d.stdlib_search, cache / "tables")
    else:
        frame = read_table(d.path)
    return from_long_frame(frame, embed=embed, text_mode=d.text_mode)


def prepare_data(cfg: RunConfig) -> Splits:
    """Load ``cfg.data`` (see :func:`load_data`) and split it by query with ``cfg.seed``."""
    data = load_data(cfg)
    return split_by_query(data, val_frac=cfg.data.val_frac, test_frac=cfg.data.test_frac, seed=cfg.seed)


def ensure_sft(cfg: RunConfig, splits: Splits, *, callbacks: Sequence[Any] = (), resume: bool = True) -> Path:
    """Path of the run's ``sft.pt``: with ``resume`` an existing one is reused and an interrupted SFT continues
    from its newest ``sft_epoch{N}.pt``; without, SFT is trained afresh."""
    path = Path(cfg.run_dir) / "sft.pt"
    if not (resume and path.exists()):
        train_sft(splits, cfg.model, cfg.sft, seed=cfg.seed, run_dir=cfg.run_dir, callbacks=callbacks,
                  progress=cfg.progress, resume=resume)
    return path


# What a resumed run may change: GRPO is the last stage, so more GRPO epochs extend it without invalidating
# anything. Every other change (data, model, SFT, RCE, seed) would make the saved checkpoints belong to
# another experiment, and RCE's temperature schedule depends on its total number of steps.
RESUMABLE_CHANGES = ("progress", "run_dir", "grpo.epochs")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "kwargs":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resumable(cfg: RunConfig, run_dir: str | Path) -> None:
    """Refuse to resume ``run_dir`` under a config that differs from the one it was started with."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return
    try:
        old = to_dict(load_config(path))
    except ConfigError as e:
        raise ConfigError(f"cannot resume {run_dir}: its config.yaml is not valid for this v3kit ({e})") from None
    details = config_changes(_flatten(old), _flatten(to_dict(cfg)), RESUMABLE_CHANGES)
    if details:
        raise ConfigError(f"cannot resume {run_dir} under another config ({details}); only {list(RESUMABLE_CHANGES)} "
                          "may change on --resume: use a new run_dir, or drop --resume to start over")


def stage_table(models: dict[str, nn.Module], data: GroupData, reference: nn.Module, temperature: float) -> pd.DataFrame:
    """One row per stage of held-out metrics, columns in :data:`METRIC_NAMES` order.

    Every stage is scored at the same ``temperature`` (the model's ``sim_temperature``), so ``entropy`` and
    ``kl_to_sft`` compare like with like even when GRPO trained at another logit temperature; the per-epoch curves
    in ``metrics.csv`` use each stage's own temperature. Ranking metrics do not depend on it.
    """
    rows = {name: evaluate(m, data, temperature=temperature, reference=reference) for name, m in models.items()}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "stage"
    return table[[c for c in METRIC_NAMES if c in table.columns]]


@dataclass
class PipelineResult:
    run_dir: Path
    splits: Splits
    stage1: Stage1
    rce: StageResult
    grpo: StageResult
    table: pd.DataFrame  # rows sft / rce / grpo, held-out test metrics
    models: dict[str, nn.Module] = field(default_factory=dict)


def run_pipeline(
    cfg: RunConfig,
    *,
    sft_checkpoint: str | Path | None = None,
    splits: Splits | None = None,
    callbacks: Sequence[Any] = (),
    resume: bool = False,
) -> PipelineResult:
    """Run SFT (unless ``sft_checkpoint``) -> stage 1 -> RCE -> GRPO in ``cfg.run_dir``; return the stage table."""
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        check_resumable(cfg, run_dir)
    dump_config(cfg, run_dir / "config.yaml")
    splits = splits or prepare_data(cfg)
    sft_path = Path(sft_checkpoint) if sft_checkpoint else ensure_sft(cfg, splits, callbacks=callbacks, resume=resume)

    stage1 = load_sft(sft_path, splits.train)
    model_cfg = stage1.model_config
    common = dict(seed=cfg.seed, run_dir=run_dir, resume=resume, callbacks=callbacks, progress=cfg.progress)
    rce = run_rce(stage1.policy, splits, cfg.rce, model_config=model_cfg, reference=stage1.reference, **common)
    after_rce = copy.deepcopy(stage1.policy)
    temperature = cfg.grpo.resolve_temperature(final_logit_temperature(cfg.rce, model_cfg.sim_temperature))
    grpo = run_grpo(stage1.policy, splits, stage1.old_log_probs, cfg.grpo, reference=stage1.reference,
                    temperature=temperature, model_config=model_cfg, **common)

    models = {"sft": stage1.reference, "rce": after_rce, "grpo": stage1.policy}
    table = stage_table(models, splits.test, stage1.reference, model_cfg.sim_temperature)
    table.to_csv(run_dir / "summary.csv")
    return PipelineResult(run_dir=run_dir, splits=splits, stage1=stage1, rce=rce, grpo=grpo, table=table,
                          models=models)
