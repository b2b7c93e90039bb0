"""The whole v3 pipeline in one call: data -> SFT (or a given v2 checkpoint) -> stage 1 -> RCE -> GRPO."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from torch import nn

from .config import ConfigError, RunConfig, dump_config, load_config, to_dict
from .checkpoint import load_checkpoint
from .data import GroupData, Splits, load_groups, split_by_query
from .grpo import run_grpo
from .model import ModelConfig
from .metrics import evaluate, metric_order
from .rce import final_logit_temperature, run_rce
from .sft import Stage1, load_sft, train_sft
from .synthetic import make_world
from .training import StageResult, config_changes


def prepare_data(cfg: RunConfig) -> Splits:
    """Load ``cfg.data.path`` (or generate the synthetic world) and split it by query with ``cfg.seed``."""
    if cfg.data.path and cfg.data.cache:  # memory-mapped splits: memory holds what the batches touch
        from .cache import cached_splits

        return cached_splits(cfg.data.path, cfg.data.feature_dtype, val_frac=cfg.data.val_frac,
                             test_frac=cfg.data.test_frac, seed=cfg.seed)
    data: GroupData = (load_groups(cfg.data.path, feature_dtype=cfg.data.feature_dtype)
                       if cfg.data.path else make_world(cfg.data.synthetic))
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
    return table[metric_order(table.columns)]


RUN_INFO = "run_info.json"  # beside config.yaml: what a run started from that the config does not say


def record_sft_checkpoint(run_dir: str | Path, sft_path: str | Path) -> None:
    """Remember which SFT checkpoint a run started from, so ``v3kit eval`` finds the ``kl_to_sft`` reference.

    Stored relative to the run dir when inside it (the run dir may move), else as an absolute path.
    """
    run_dir, sft_path = Path(run_dir).resolve(), Path(sft_path).resolve()
    rel = sft_path.relative_to(run_dir) if sft_path.is_relative_to(run_dir) else sft_path
    (run_dir / RUN_INFO).write_text(json.dumps({"sft_checkpoint": str(rel)}, indent=1) + "\n")


def recorded_sft_checkpoint(run_dir: str | Path) -> Path | None:
    """The SFT checkpoint :func:`record_sft_checkpoint` stored for ``run_dir`` (None for runs that predate it)."""
    path = Path(run_dir) / RUN_INFO
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text()).get("sft_checkpoint")
    except (json.JSONDecodeError, AttributeError):
        return None
    return None if not recorded else Path(run_dir) / recorded  # an absolute path stays absolute


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
    if sft_checkpoint:
        # The given checkpoint's model is what runs, whatever cfg.model says: record that one in config.yaml.
        cfg = dataclasses.replace(cfg, model=ModelConfig(**load_checkpoint(sft_checkpoint)["model_config"]))
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        check_resumable(cfg, run_dir)
    dump_config(cfg, run_dir / "config.yaml")
    splits = splits or prepare_data(cfg)
    sft_path = Path(sft_checkpoint) if sft_checkpoint else ensure_sft(cfg, splits, callbacks=callbacks, resume=resume)
    record_sft_checkpoint(run_dir, sft_path)

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


# ------------------------------------------------------------------------------------ stage reuse (notebooks)
# The notebooks share one run directory and each can also run alone: ensure_stage1 / ensure_rce reuse sft.pt /
# rce_epoch{N}.pt when an earlier notebook made them from the same data and settings (recorded in
# notebook_state.json), and otherwise (re)make them, removing later stages' outputs derived from the old ones.
STATE_FILE = "notebook_state.json"


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def read_state(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _write_state(run_dir: Path, state: dict[str, Any]) -> None:
    (run_dir / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True))


def _invalidate(run_dir: Path, stages: Sequence[str], state: dict[str, Any]) -> None:
    """Remove outputs of ``stages`` (derived from an earlier stage that is being remade) and their log rows."""
    removed = [p for s in stages for p in sorted(run_dir.glob(f"{s}_epoch*.pt"))]
    for p in removed:
        p.unlink()
    metrics = run_dir / "metrics.csv"
    if metrics.exists():
        df = pd.read_csv(metrics)
        if df["stage"].isin(stages).any():
            df[~df["stage"].isin(stages)].to_csv(metrics, index=False)
    for s in stages:
        state.pop(s, None)
    if removed:
        print(f"removed {len(removed)} stale checkpoint(s) of {', '.join(stages)} made from the previous inputs")


def ensure_stage1(cfg: RunConfig, splits: Splits, *, sft_checkpoint: str | Path | None = None,
                  callbacks: Sequence[Any] = ()) -> Stage1:
    """Stage 1 on ``cfg.run_dir/sft.pt``: copy ``sft_checkpoint`` there if given, else reuse the one an earlier
    notebook made with the same data and SFT settings, else train SFT (``callbacks`` see that training)."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = read_state(run_dir)
    sft_path = run_dir / "sft.pt"
    data_sig = _jsonable({"seed": cfg.seed, "data": to_dict(cfg.data)})
    sft_sig = _jsonable({"model": to_dict(cfg.model), "sft": to_dict(cfg.sft)})
    prev = state.get("stage1")
    if sft_checkpoint is not None:
        src = Path(sft_checkpoint).resolve()
        want = {"data": data_sig, "sft": {"external": str(src)}}
        if src != sft_path.resolve():
            shutil.copyfile(src, sft_path)
        print(f"using the given SFT checkpoint {src} (copied to {sft_path})")
        origin = "given"
    elif (sft_path.exists() and prev is not None and prev.get("data") == data_sig
          and (prev.get("sft") == sft_sig or "external" in prev.get("sft", {}))):
        want = prev
        print(f"reusing {sft_path} (same data and SFT settings as the notebook that made it)")
        origin = "reused"
    else:
        want = {"data": data_sig, "sft": sft_sig}
        why = "none in the run dir yet" if not sft_path.exists() else "data or SFT settings changed"
        print(f"training SFT ({why}) -> {sft_path}")
        origin = "trained"
        _invalidate(run_dir, ("rce", "grpo"), state)
        train_sft(splits, cfg.model, cfg.sft, seed=cfg.seed, run_dir=run_dir, callbacks=callbacks,
                  progress=cfg.progress)
    if prev != want:
        _invalidate(run_dir, ("rce", "grpo"), state)
    state["stage1"] = want
    _write_state(run_dir, state)
    stage1 = load_sft(sft_path, splits.train)
    stage1.origin = origin
    return stage1


def ensure_rce(cfg: RunConfig, splits: Splits, stage1: Stage1, *, callbacks: Sequence[Any] = (),
               fresh: bool = False) -> StageResult:
    """Stage 2 on ``stage1.policy`` (in place): reuse ``rce_epoch{epochs}.pt`` made from the same stage 1 with the
    same RCE settings (unless ``fresh``), else train RCE. ``result.model`` is the post-RCE policy."""
    run_dir = Path(cfg.run_dir)
    state = read_state(run_dir)
    want = _jsonable({"stage1": state.get("stage1"), "rce": to_dict(cfg.rce)})
    last = run_dir / f"rce_epoch{cfg.rce.epochs}.pt"
    reuse = not fresh and state.get("rce") == want and (cfg.rce.epochs == 0 or last.exists())
    if reuse:
        print(f"reusing {last.name} (same SFT and RCE settings as the notebook that made it)")
    else:
        print(f"training RCE for {cfg.rce.epochs} epoch(s) -> {run_dir}/rce_epoch*.pt")
        _invalidate(run_dir, ("rce", "grpo"), state)
    result = run_rce(stage1.policy, splits, cfg.rce, model_config=stage1.model_config, reference=stage1.reference,
                     seed=cfg.seed, run_dir=run_dir, resume=reuse, callbacks=callbacks, progress=cfg.progress)
    state["rce"] = want
    _write_state(run_dir, state)
    result.info["origin"] = "reused" if reuse else "trained"
    return result
