"""Write ``device_golden.json``: what the tiny pipeline produced on CPU before runs could pick a device.

Run from the repository root with ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD python tests/data/make_device_golden.py``.
It was run once on the commit *before* the ``device`` / ``precision`` / ``threads`` keys existed (and before the
per-step statistics stayed on the device), so ``tests/test_device.py`` can check that CPU numbers did not move.
Regenerate it only when a change is *meant* to alter the numbers, and say so in the commit.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_config  # noqa: E402

from v3kit.pipeline import run_pipeline  # noqa: E402

# The default tiny run and the one GRPO mode that draws random numbers per step (torch.multinomial).
CASES = {"default": [], "sampled": ["grpo.samples=sampled"]}


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def summarise(run_dir: Path, overrides: list[str]) -> dict:
    r = run_pipeline(tiny_config(run_dir, *overrides))
    metrics = pd.read_csv(run_dir / "metrics.csv")
    return {
        "overrides": overrides,
        "table": {stage: {k: float(v) for k, v in row.items()} for stage, row in r.table.iterrows()},
        "grpo_weights_sha256": weights_digest(r.models["grpo"]),
        # every logged number, one list per column (None where a stage does not log the column)
        "metrics": {c: [None if pd.isna(v) else (v if isinstance(v, str) else float(v)) for v in metrics[c]]
                    for c in metrics.columns},
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        out = {name: summarise(Path(tmp) / name, ov) for name, ov in CASES.items()}
    path = Path(__file__).with_name("device_golden.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes)")
