"""Notebook 05 (your own data and v2 model) runs end to end under papermill on a small built-in stdlib table:
import of the example v2 class, RCE + GRPO, the doctor, its grid and the ablation of that grid."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml
from conftest import kernel_name

from v3kit.notebook import tools as notebook_tools

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "notebooks" / "05_your_own_data.py"
# Measured: 49 s for the whole test at load average 7 on 2 cores, empty cache, before the verdict section (which
# runs 8 smoke runs); 146 s with the full verdict grid at load average ~9. Only catches size regressions.
TIME_LIMIT_S = 180

papermill = pytest.importorskip("papermill")
pytest.importorskip("sentence_transformers")  # the stdlib table is text: the frozen encoder embeds it


@pytest.mark.slow
def test_notebook_05_runs_with_smoke_params(tmp_path, monkeypatch):
    # A private cache: the test neither depends on nor writes to the user's ~/.cache/v3kit.
    monkeypatch.setenv("V3KIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("V3KIT_LIVE", "0")
    out = tmp_path / "out.ipynb"
    notebook = notebook_tools.to_ipynb(SOURCE, tmp_path / "src.ipynb")
    papermill.execute_notebook(
        str(notebook),
        str(out),
        parameters={"smoke": True, "run_dir": str(tmp_path / "run")},
        kernel_name=kernel_name(),
        cwd=str(tmp_path),
        progress_bar=False,
    )
    nb = nbformat.read(str(out), as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert nb.metadata.papermill.duration < TIME_LIMIT_S, f"smoke notebook took {nb.metadata.papermill.duration:.0f} s"
    assert any((tmp_path / "cache").rglob("*")), "the embeddings were not cached under V3KIT_CACHE_DIR"
    results = notebook_tools.read_results(nb)

    # The table: its agreement is recomputed here from the cached table file, not taken from the notebook.
    [table_file] = (tmp_path / "cache" / "tables").glob("stdlib_search-*.parquet")
    table = pd.read_parquet(table_file)
    top = table.loc[table.groupby("query_id")["reward"].idxmax()]
    assert results["agreement"] == pytest.approx(top["is_label"].mean(), abs=1e-4)
    assert results["n_queries"] == table["query_id"].nunique() <= 60
    assert {"query_text", "candidate_text", "reward", "is_label"} <= set(results["columns"])

    # The v2 model was imported (not trained by v3kit), and the run started from it.
    assert results["sft_origin"] == "imported"
    assert (tmp_path / "run" / "v2" / "v2.pt").is_file() and (tmp_path / "run" / "v2" / "sft.pt").is_file()
    run_cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert run_cfg["model"]["target"].endswith("models.py:MyTwoTower")

    table_rows = results["stage_table"]
    assert set(table_rows) == {"sft", "rce", "grpo", "selected"}
    assert all("acc@1" in row and "utility@1" not in row for row in table_rows.values())  # real data: no utility

    # The doctor ran every check, and its grid holds run, sft_only and one variant per flagged switch.
    assert {"step0_ratio", "reward_vs_label", "baselines"} <= set(results["doctor_checks"])
    assert set(results["doctor_flags"]) <= set(results["doctor_checks"])
    grid = yaml.safe_load(Path(results["grid_path"]).read_text())
    assert Path(results["grid_path"]) == tmp_path / "run" / "doctor_grid.yaml"
    assert grid["sft_checkpoint"] == str((tmp_path / "run" / "v2" / "sft.pt").resolve())
    assert len(grid["seeds"]) == 2

    # The ablation ran every variant of that grid, each over its seeds.
    assert results["ablation_variants"] == list(grid["variants"])
    assert {"run", "sft_only"} <= set(results["ablation_variants"])
    assert results["ablation_runs"] == len(grid["variants"]) * len(grid["seeds"])
    for variant in grid["variants"]:
        for seed in grid["seeds"]:
            assert (tmp_path / "run" / "ablation" / "default" / variant / f"seed{seed}" / "result.json").is_file()
    assert results["conclusions"]

    # The notebook ends with the verdict, whose config trains as is.
    v = results["verdict"]
    assert v["recommendation"] in ("keep_sft", "rce_only", "variant") and v["metric"] == "acc@1"
    assert Path(v["config"]).is_file() and (tmp_path / "run" / "investigate" / "verdict.md").is_file()
    assert v["effect_vs_sft"][1] <= v["effect_vs_sft"][0] <= v["effect_vs_sft"][2]
    assert v["sentence"] and v["search"]["trials"] <= 4  # the smoke search: at most 4 trials
