"""The README's stage table is what `make run` prints: refactors must not change a number.

Runs the default pipeline (the seed settings, ~10 s on 2 cores) and compares every printed value with the table
under "Two commands" in the README, to the 4 decimals shown there. The README's table was printed on one CPU; on
another, float32 kernels round differently (drift ~1e-6 relative, see tests/test_device.py), which can move a value
across a rounding boundary of its last printed digit: so a printed value may differ by one unit in that digit, no
more. Same-machine bitwise reproducibility is tests/test_device.py's job.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from v3kit.cli import main

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("sft", "rce", "grpo", "selected")  # the table's rows: the stages, and the model the run ships


def _readme_table() -> dict[str, dict[str, str]]:
    text = (ROOT / "README.md").read_text()
    block = text.split("held-out test metrics by stage (run dir: runs/seed)\n", 1)[1].split("```", 1)[0]
    lines = [ln for ln in block.splitlines() if ln.strip()]
    header = lines[0].split()
    rows = {}
    for ln in lines[1:]:
        parts = ln.split()
        if parts[0] in STAGES:
            rows[parts[0]] = dict(zip(header, parts[1:]))
    return rows


@pytest.mark.slow
def test_make_run_prints_the_readme_stage_table(tmp_path, capsys):
    expected = _readme_table()
    assert set(expected) == set(STAGES) and len(expected["grpo"]) >= 7
    assert main(["run", "--set", f"run_dir={tmp_path / 'seed'}", "--set", "progress=false"]) == 0
    out = capsys.readouterr().out
    printed = {}
    for ln in out.splitlines():
        m = re.match(r"^(sft|rce|grpo|selected)\s+(-?\d.*)$", ln)  # a row of numbers, not the selection line
        if m:
            printed[m.group(1)] = m.group(2).split()
    header = out.split("held-out test metrics by stage", 1)[1].splitlines()[1].split()
    got = {stage: dict(zip(header, vals)) for stage, vals in printed.items()}
    assert set(got) == set(expected) and all(set(got[s]) == set(expected[s]) for s in got), (got, expected)
    for stage, row in expected.items():
        for key, want in row.items():
            have = got[stage][key]
            decimals = len(want.split(".")[1]) if "." in want else 0
            assert len(have.split(".")[1] if "." in have else "") == decimals, (stage, key, have, want)
            unit = 10.0**-decimals  # one unit in the last printed digit (+ parsing slack)
            assert abs(float(have) - float(want)) <= unit * (1 + 1e-6), (stage, key, have, want)
