"""Notebook 04 runs end to end under papermill with the smoke grid: no errors, figures, generated conclusions."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from conftest import kernel_name

from v3kit.notebook import tools as notebook_tools

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "notebooks" / "04_why_grpo_underperforms.py"

papermill = pytest.importorskip("papermill")


@pytest.mark.slow
def test_notebook_04_runs_with_smoke_params(tmp_path):
    out = tmp_path / "out.ipynb"
    notebook = notebook_tools.to_ipynb(SOURCE, tmp_path / "src.ipynb")
    papermill.execute_notebook(
        str(notebook),
        str(out),
        parameters={"smoke": True, "out_dir": str(tmp_path / "grid"), "n_boot": 500},
        kernel_name=kernel_name(),
        cwd=str(tmp_path),
        progress_bar=False,
    )
    nb = json.loads(out.read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, errors
    html = ["".join(o["data"]["text/html"]) for o in outputs if "text/html" in o.get("data", {})]
    summary = [h for h in html if "<table" in h and "acc@1" in h and "kl_beta_0" in h]
    assert summary, "the summary is shown as a rendered table"  # text wraps unreadably in a narrow Lab panel
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 8  # forest x2, curves x2, shortcut, kl_beta, epochs x2, worlds
    results = notebook_tools.read_results(nbformat.read(str(out), as_version=4))
    assert "World 'default'" in results["conclusions"]  # the generated conclusion
    assert "significantly better than SFT" in results["conclusions"]
    assert set(results["doctor_flags"]) >= {"seed"}  # the doctor ran on the seed run
    shares = results["shortcut_share"]  # the smoke grid's worlds: reward_bias 0.5 (default) and 0.0
    assert shares["default"] > shares["bias_0.0"]
    assert results["runs_executed"] > 0
    assert (tmp_path / "grid" / "results.parquet").exists()
