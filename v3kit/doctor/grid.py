"""``v3kit doctor RUN --grid``: an ablation grid that tests the doctor's suggestions against the run itself.

The doctor reads one run; a switch it suggests is a hypothesis until an ablation shows it beats the run. The grid
written here is that ablation: ``base`` is the run's own config (its differences from the defaults), the variants
are the run as it was (``run``, the reference), ``sft_only`` and one variant per suggested switch, with a question
each. ``v3kit ablate --grid RUN/doctor_grid.yaml`` runs it (one shared SFT checkpoint, seeds, bootstrap CIs).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from ..ablate.grid import parse_grid
from ..config import RunConfig, load_config, to_dict
from ..pipeline import recorded_sft_checkpoint
from ..provenance import RUNNER_KEYS, flatten
from ..rundir import atomic_write_text

GRID_FILE = "doctor_grid.yaml"


def variant_name(switch: str) -> str:
    """``grpo.old_policy=refresh_at_start`` -> ``old_policy_refresh_at_start`` (a readable variant name); a switch
    of several space-separated overrides joins their names with ``+``."""
    names = []
    for part in switch.split():
        key, _, value = part.partition("=")
        names.append(re.sub(r"[^A-Za-z0-9_.@-]+", "_", f"{key.rsplit('.', 1)[-1]}_{value}").strip("_"))
    return "+".join(names)


def switch_overrides(switch: str) -> list[str]:
    """The ``key=value`` overrides of a switch (one, or several separated by spaces: tested together)."""
    return switch.split()


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-4].strip() if text.endswith("\n...") else text


def run_overrides(cfg: RunConfig) -> list[str]:
    """``key=value`` for every setting of ``cfg`` that differs from the defaults (runner keys left out)."""
    ours, default = flatten(to_dict(cfg)), flatten(to_dict(RunConfig()))
    return [f"{k}={_yaml_value(v)}" for k, v in ours.items() if k not in RUNNER_KEYS and default.get(k, object()) != v]


def doctor_grid(
    cfg: RunConfig,
    findings: Iterable[Any],
    *,
    name: str = "doctor",
    n_seeds: int = 3,
    sft_checkpoint: str | Path | None = None,
) -> dict[str, Any]:
    """The grid (as a YAML-ready mapping) testing each flagged finding's switches against ``cfg``; with
    ``sft_checkpoint`` every variant starts from that SFT model (the run's own), so ``run`` repeats the run."""
    variants: dict[str, list[str]] = {"sft_only": ["rce.epochs=0", "grpo.epochs=0"], "run": []}
    questions: dict[str, list[str]] = {}
    for f in findings:
        if not f.triggered:
            continue
        for switch in f.switches:
            v = variant_name(switch)
            if v in variants:
                continue
            variants[v] = switch_overrides(switch)
            questions[f"{f.check}: does {switch} beat the run?"] = [v, "run"]
    grid: dict[str, Any] = {
        "name": name,
        "base": run_overrides(cfg),
        "seeds": [cfg.seed + i for i in range(n_seeds)],
        "sft_seed": cfg.seed,
        "reference": "run",
        "variants": variants,
    }
    if sft_checkpoint is not None:
        grid["sft_checkpoint"] = str(Path(sft_checkpoint).resolve())
    if questions:
        grid["questions"] = questions
    return grid


def write_doctor_grid(run_dir: str | Path, findings: Iterable[Any], *, n_seeds: int = 3) -> Path:
    """Write :func:`doctor_grid` of ``run_dir``'s ``config.yaml`` to ``run_dir/doctor_grid.yaml`` (validated by
    parsing it back as a grid first, so a written file always runs)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: `doctor --grid` needs the run's config.yaml")
    cfg = load_config(cfg_path)

    sft = recorded_sft_checkpoint(run_dir) or run_dir / "sft.pt"  # the run's own SFT (an imported v2 model too)
    grid = doctor_grid(
        cfg,
        findings,
        name=f"doctor_{run_dir.name}",
        n_seeds=n_seeds,
        sft_checkpoint=sft if Path(sft).is_file() else None,
    )
    parse_grid(grid, name=grid["name"])  # fail here, naming the key, rather than in `v3kit ablate`
    path = run_dir / GRID_FILE
    header = (
        f"# Written by `v3kit doctor {run_dir} --grid`: tests the doctor's suggestions against this run.\n"
        f"#   v3kit ablate --grid {path}\n"
    )
    atomic_write_text(path, header + yaml.safe_dump(grid, sort_keys=False, width=120))
    return path
