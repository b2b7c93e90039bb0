"""Write ``device_golden.json``: what the tiny pipeline produced on CPU before runs could pick a device.

Run from the repository root with ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD python tests/data/make_device_golden.py``.
It was run once on the commit *before* the ``device`` / ``precision`` / ``threads`` keys existed (and before the
per-step statistics stayed on the device), so ``tests/test_device.py`` can check that CPU numbers did not move.
Regenerate it only when a change is *meant* to alter the numbers, and say so in the commit.

The file's numbers are one machine's: another CPU's vector kernels round float32 differently, so the test compares
them within float32-derived tolerances. To check that a refactor changes no number *bit for bit* on your machine,
write the summary to another path before and after the change and compare the two files::

    python tests/data/make_device_golden.py /tmp/before.json   # on the commit before the change
    python tests/data/make_device_golden.py /tmp/after.json    # with the change
    cmp /tmp/before.json /tmp/after.json                        # identical: every number and the weights' SHA-256

``grpo_weights_stats`` (per tensor of the final GRPO weights: sum, sum of magnitudes, L2 norm, in float64) was added
later, on another CPU than the rest of the file, from a run whose other numbers agree with it within those
tolerances; the weights' SHA-256 is only meaningful on the machine that wrote it.
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


def weights_stats(model: torch.nn.Module) -> dict[str, list[float]]:
    """Per tensor ``[sum, sum of |w|, L2 norm]`` in float64: comparable across machines within a tolerance, where
    the SHA-256 of the bytes is not."""
    out = {}
    for name, t in sorted(model.state_dict().items()):
        w = t.detach().cpu().double()
        out[name] = [float(w.sum()), float(w.abs().sum()), float(w.norm())]
    return out


def summarise(run_dir: Path, overrides: list[str]) -> dict:
    r = run_pipeline(tiny_config(run_dir, *overrides))
    metrics = pd.read_csv(run_dir / "metrics.csv")
    return {
        "overrides": overrides,
        "table": {stage: {k: float(v) for k, v in row.items()} for stage, row in r.table.iterrows()},
        "grpo_weights_sha256": weights_digest(r.models["grpo"]),
        "grpo_weights_stats": weights_stats(r.models["grpo"]),
        # every logged number, one list per column (None where a stage does not log the column)
        "metrics": {
            c: [None if pd.isna(v) else (v if isinstance(v, str) else float(v)) for v in metrics[c]]
            for c in metrics.columns
        },
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        out = {name: summarise(Path(tmp) / name, ov) for name, ov in CASES.items()}
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("device_golden.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes)")
