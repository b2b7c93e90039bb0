"""Support for the notebooks in ``notebooks/``: their shared config, reuse of earlier stages, output stripping.

The three notebooks share one run directory (``runs/notebooks`` by default). Each can run alone or in order:
:func:`ensure_stage1` and :func:`ensure_rce` reuse ``sft.pt`` / ``rce_epoch{N}.pt`` from an earlier notebook when
they were made with the same data and settings (recorded in ``notebook_state.json``), and otherwise (re)make them,
removing the later stages' outputs that were derived from the old ones.

Command line (``make strip-notebooks``)::

    python -m v3kit.notebook_tools strip notebooks/*.ipynb   # drop outputs, execution counts, run metadata
    python -m v3kit.notebook_tools check notebooks/*.ipynb   # exit 1 if any notebook is not clean
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from .config import RunConfig, from_dict, to_dict
from .data import Splits
from .model import ModelConfig
from .rce import final_logit_temperature, run_rce
from .sft import Stage1, load_sft, train_sft
from .training import StageResult

STATE_FILE = "notebook_state.json"

# Sizes for smoke=True: each notebook runs in well under 30 s on 2 CPU cores.
SMOKE = {"n_queries": 300, "sft_epochs": 4, "rce_epochs": 2, "grpo_epochs": 2}


# ----------------------------------------------------------------------------------------------- config
def notebook_config(
    *,
    run_dir: str = "runs/notebooks",
    seed: int = 0,
    smoke: bool = False,
    n_queries: int | None = None,
    sft_epochs: int | None = None,
    rce_epochs: int | None = None,
    rce_lr: float | None = None,
    grpo_epochs: int | None = None,
    grpo_lr: float | None = None,
    grpo: dict[str, Any] | None = None,
    rce: dict[str, Any] | None = None,
) -> RunConfig:
    """The seed's settings (``configs/seed.yaml``) with the notebook parameters applied.

    ``None`` keeps the seed's value, or the :data:`SMOKE` size when ``smoke``; ``grpo`` / ``rce`` are further
    config keys of those sections (validated like a YAML config).
    """
    def pick(value: Any, name: str) -> Any:
        return value if value is not None else SMOKE.get(name) if smoke else None

    raw: dict[str, Any] = {"run_dir": str(run_dir), "seed": int(seed), "progress": False,
                           "data": {"synthetic": {}}, "sft": {}, "rce": dict(rce or {}), "grpo": dict(grpo or {})}
    for section, key, value in (("synthetic", "n_queries", pick(n_queries, "n_queries")),
                                ("sft", "epochs", pick(sft_epochs, "sft_epochs")),
                                ("rce", "epochs", pick(rce_epochs, "rce_epochs")),
                                ("rce", "lr", rce_lr),
                                ("grpo", "epochs", pick(grpo_epochs, "grpo_epochs")),
                                ("grpo", "lr", grpo_lr)):
        if value is not None:
            (raw["data"]["synthetic"] if section == "synthetic" else raw[section])[key] = value
    return from_dict(RunConfig, raw)


def grpo_temperature(cfg: RunConfig, model_config: ModelConfig) -> float:
    """GRPO's logit temperature, resolved as the pipeline does (``same_as_rce_end`` follows RCE's schedule)."""
    return cfg.grpo.resolve_temperature(final_logit_temperature(cfg.rce, model_config.sim_temperature))


# ----------------------------------------------------------------------------------------------- stage reuse
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
    elif (sft_path.exists() and prev is not None and prev.get("data") == data_sig
          and (prev.get("sft") == sft_sig or "external" in prev.get("sft", {}))):
        want = prev
        print(f"reusing {sft_path} (same data and SFT settings as the notebook that made it)")
    else:
        want = {"data": data_sig, "sft": sft_sig}
        why = "none in the run dir yet" if not sft_path.exists() else "data or SFT settings changed"
        print(f"training SFT ({why}) -> {sft_path}")
        _invalidate(run_dir, ("rce", "grpo"), state)
        train_sft(splits, cfg.model, cfg.sft, seed=cfg.seed, run_dir=run_dir, callbacks=callbacks,
                  progress=cfg.progress)
    if prev != want:
        _invalidate(run_dir, ("rce", "grpo"), state)
    state["stage1"] = want
    _write_state(run_dir, state)
    return load_sft(sft_path, splits.train)


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
    return result


# ----------------------------------------------------------------------------------------------- stripping
def _nbformat() -> Any:
    import nbformat

    return nbformat


def strip_notebook(nb: Any) -> bool:
    """Drop outputs, execution counts and per-run metadata from ``nb`` in place; True if anything changed."""
    before = json.dumps(nb, sort_keys=True, default=str)
    for key in ("widgets", "papermill"):
        nb.metadata.pop(key, None)
    for cell in nb.cells:
        for key in ("execution", "papermill", "scrolled", "collapsed"):
            cell.metadata.pop(key, None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    return json.dumps(nb, sort_keys=True, default=str) != before


def notebook_problems(path: str | Path) -> list[str]:
    """Why a committed notebook is not clean: outputs, execution counts, run metadata, not one ``parameters`` cell."""
    nb = _nbformat().read(str(path), as_version=4)
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if cell.get("outputs"):
            found.append(f"{path}: cell {i} has {len(cell.outputs)} output(s)")
        if cell.get("execution_count") is not None:
            found.append(f"{path}: cell {i} has execution_count {cell.execution_count}")
        if "injected-parameters" in cell.metadata.get("tags", []):
            found.append(f"{path}: cell {i} is papermill's injected-parameters cell")
    if "widgets" in nb.metadata or "papermill" in nb.metadata:
        found.append(f"{path}: notebook metadata holds run state (widgets/papermill)")
    n_params = sum("parameters" in c.metadata.get("tags", []) for c in nb.cells)
    if n_params != 1:
        found.append(f"{path}: {n_params} cells tagged 'parameters' (papermill needs exactly one)")
    return found


def strip(paths: Sequence[str | Path]) -> list[Path]:
    """Strip notebooks in place; return those that changed."""
    nbf = _nbformat()
    changed = []
    for p in map(Path, paths):
        nb = nbf.read(str(p), as_version=4)
        if strip_notebook(nb):
            nbf.write(nb, str(p))
            changed.append(p)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] not in ("strip", "check"):
        print("usage: python -m v3kit.notebook_tools {strip|check} NOTEBOOK.ipynb ...", file=sys.stderr)
        return 2
    if args[0] == "strip":
        for p in strip(args[1:]):
            print(f"stripped {p}")
        return 0
    problems = [msg for p in args[1:] for msg in notebook_problems(p)]
    for msg in problems:
        print(msg, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
