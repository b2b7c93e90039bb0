"""A run trained from investigate's ``recommended.yaml`` prints only the stages it ran, and says what it is."""

from __future__ import annotations

import json

from conftest import tiny_config

from v3kit.cli import main
from v3kit.config import dump_config


def printed_stages(printed: str) -> list[str]:
    """The row names of the printed stage table (pandas may wrap its columns into several blocks)."""
    table = printed.split("held-out test metrics by stage")[1].split("\n\n")[0].splitlines()
    names = [line.split()[0] for line in table if line.split() and line.split()[0] in STAGES]
    return list(dict.fromkeys(names))


STAGES = {"sft", "rce", "grpo", "selected"}


def test_an_rce_only_recommendation_prints_only_its_stages_and_says_what_it_is(tmp_path, capsys):
    run = tmp_path / "run"
    out = run / "investigate"
    out.mkdir(parents=True)
    cfg = tiny_config(out / "recommended_run", "grpo.epochs=0", "rce.epochs=1", "sft.epochs=1")
    dump_config(cfg, out / "recommended.yaml")
    verdict = {
        "metric": "acc@1",
        "variant": "rce_only",
        "config": str(out / "recommended.yaml"),
        "effect_vs_sft": [0.0125, -0.01, 0.035],
    }
    (out / "verdict.json").write_text(json.dumps(verdict))
    assert main(["run", "--config", str(out / "recommended.yaml")]) == 0
    printed = capsys.readouterr().out
    assert printed_stages(printed) == ["sft", "rce", "selected"], printed
    assert "GRPO step-0" not in printed and "investigate " + str(out / "recommended_run") not in printed
    last = printed.strip().splitlines()[-1]
    assert last == (
        f"this is investigate's recommendation for {run} (rce_only); compare with the verdict's acc@1 effect vs "
        f"SFT +0.0125 [-0.0100, +0.0350] in {out / 'verdict.md'}"
    )


def test_an_ordinary_run_prints_every_stage_and_points_at_investigate(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run", "sft.epochs=1", "rce.epochs=0", "grpo.epochs=1")
    dump_config(cfg, tmp_path / "run.yaml")
    assert main(["run", "--config", str(tmp_path / "run.yaml")]) == 0
    printed = capsys.readouterr().out
    assert printed_stages(printed) == ["sft", "grpo", "selected"], printed
    assert "GRPO step-0 ratio" in printed
    assert printed.strip().splitlines()[-1] == f"What to ship instead: v3kit investigate {tmp_path / 'run'}"
