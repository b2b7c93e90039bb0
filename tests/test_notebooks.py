"""The notebooks, executed headless by papermill with smoke parameters, and the rules their sources follow.

Each notebook's source is ``notebooks/NN_name.py`` (jupytext py:percent); the tests build the ``.ipynb`` from it in
a temp dir. Two executions run side by side: the three notebooks *in order* in one shared run dir (live plotting
on, as in JupyterLab), and ``03_grpo`` *standalone* in an empty run dir with ``V3KIT_LIVE=0`` (the headless path),
which must create the SFT checkpoint and RCE output itself. Assertions read the named results each notebook
records (:func:`v3kit.notebook.tools.record`), never cell positions or printed text.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml
from conftest import kernel_name

from v3kit.notebook import tools as notebook_tools

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
OURS = ("01_sft_load", "02_rce_warmup", "03_grpo")
KL_BETAS = [0.0, 0.01, 0.1, 0.5]
TIME_LIMIT_S = 90  # smoke notebooks take ~10-20 s on 2 idle cores; this only catches a size regression


def _papermill(name: str, out_dir: Path, run_dir: Path, env: dict[str, str], **params) -> list[str]:
    params = {"smoke": True, "run_dir": str(run_dir), **params}
    src = notebook_tools.to_ipynb(NB_DIR / f"{name}.py", out_dir / "src" / f"{name}.ipynb")
    return [
        sys.executable,
        "-m",
        "papermill",
        str(src),
        str(out_dir / f"{name}.ipynb"),
        "-k",
        kernel_name(),
        "--cwd",
        str(NB_DIR),
        "-y",
        json.dumps(params),
        "--no-progress-bar",
    ]


def _env(live: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)  # the kernel keeps its inline backend
    if live:
        env.pop("V3KIT_LIVE", None)
    else:
        env["V3KIT_LIVE"] = "0"
    return env


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Run the chain 01 -> 02 -> 03 and a standalone 03 concurrently; return their dirs and wall times."""
    chain_dir = tmp_path_factory.mktemp("chain")
    alone_dir = tmp_path_factory.mktemp("standalone")
    chain = [
        _papermill(
            n, chain_dir, chain_dir / "run", _env(live=True), **({"kl_betas": KL_BETAS} if n == "03_grpo" else {})
        )
        for n in OURS
    ]
    alone = _papermill("03_grpo", alone_dir, alone_dir / "run", _env(live=False), kl_betas=KL_BETAS[:2])
    t0 = time.perf_counter()
    standalone = subprocess.Popen(
        alone, env=_env(live=False), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    logs, walls = {}, {}
    for name, cmd in zip(OURS, chain):
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=_env(live=True), capture_output=True, text=True)
        walls[name] = time.perf_counter() - start
        logs[name] = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{name} failed:\n{logs[name][-4000:]}"
    out, _ = standalone.communicate()
    walls["03_grpo standalone"] = time.perf_counter() - t0
    assert standalone.returncode == 0, f"standalone 03_grpo failed:\n{out[-4000:]}"
    print("papermill wall times (s):", {k: round(v, 1) for k, v in walls.items()})
    return {"chain": chain_dir, "alone": alone_dir, "walls": walls}


def _read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(str(path), as_version=4)


def _code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def _text(cell) -> str:
    parts = []
    for o in cell.outputs:
        if o.output_type == "stream":
            parts.append(o.text)
        elif "data" in o:
            parts.append(o.data.get("text/html", "") + o.data.get("text/plain", ""))
    return "\n".join(parts)


def _check_executed(nb) -> None:
    errors = [o for c in _code_cells(nb) for o in c.outputs if o.output_type == "error"]
    assert not errors, f"error output: {errors[0].ename}: {errors[0].evalue}"
    plot_cells = [c for c in _code_cells(nb) if "plot" in c.metadata.get("tags", [])]
    assert plot_cells
    for c in plot_cells:
        pngs = [o for o in c.outputs if "image/png" in o.get("data", {})]
        # Exactly one: a live plot updates its own output in place instead of appending figures.
        assert len(pngs) == 1, f"plot cell shows {len(pngs)} PNGs:\n{c.source[:200]}"
    duration = nb.metadata.papermill.duration
    assert duration < TIME_LIMIT_S, f"smoke notebook took {duration:.0f} s"


def _epoch_loss(metrics: pd.DataFrame, stage: str) -> pd.Series:
    rows = metrics[(metrics["stage"] == stage) & (metrics["split"] == "train")]
    return rows.groupby("epoch")["loss"].mean()


@pytest.mark.slow
def test_notebooks_in_order_share_the_run_dir(executed):
    d = executed["chain"]
    nbs = {n: _read(d / f"{n}.ipynb") for n in OURS}
    for nb in nbs.values():
        _check_executed(nb)
    run = d / "run"
    for f in ("sft.pt", "metrics.csv", "rce_epoch1.pt", "rce_epoch2.pt", "grpo_epoch1.pt", "grpo_epoch2.pt"):
        assert (run / f).is_file(), f
    metrics = pd.read_csv(run / "metrics.csv")
    assert set(metrics["stage"]) == {"sft", "rce", "grpo"}
    sft, rce = _epoch_loss(metrics, "sft"), _epoch_loss(metrics, "rce")
    assert sft.iloc[-1] < sft.iloc[0], f"SFT loss did not fall: {sft.to_dict()}"
    # RCE's raw loss must fall: its floor H(targets) drops as T anneals (notebook 02 explains why that alone
    # does not prove learning).
    assert rce.iloc[-1] < rce.iloc[0], f"RCE loss did not fall: {rce.to_dict()}"

    results = {n: notebook_tools.read_results(nb) for n, nb in nbs.items()}
    assert results["01_sft_load"]["sft_origin"] == "trained"
    assert results["02_rce_warmup"]["sft_origin"] == "reused"  # in order: 02 reuses 01's checkpoint
    assert results["03_grpo"]["sft_origin"] == "reused" and results["03_grpo"]["rce_origin"] == "reused"
    assert {results["02_rce_warmup"]["rce_raw_loss"], results["02_rce_warmup"]["rce_excess_loss"]} <= {
        "falling",
        "plateau",
        "rising",
        "too short",
    }
    assert isinstance(results["02_rce_warmup"]["rce_converged"], bool)  # the doctor's verdict, shown by the notebook
    assert 0 <= results["01_sft_load"]["stage1"]["label_is_top_reward"] <= 1
    assert set(results["03_grpo"]["stage_table"]) == {"sft", "rce", "grpo"}
    assert results["03_grpo"]["panel_runs"] == len(KL_BETAS)  # one table row per kl_beta
    assert results["03_grpo"]["panel_settings"] == KL_BETAS


@pytest.mark.slow
def test_grpo_notebook_standalone_creates_what_it_needs(executed):
    d = executed["alone"]
    nb = _read(d / "03_grpo.ipynb")
    _check_executed(nb)
    results = notebook_tools.read_results(nb)
    assert results["sft_origin"] == "trained" and results["rce_origin"] == "trained"
    run = d / "run"
    assert sorted(p.name for p in run.glob("*_epoch*.pt") if not p.name.startswith("sft")) == [
        "grpo_epoch1.pt",
        "grpo_epoch2.pt",
        "rce_epoch1.pt",
        "rce_epoch2.pt",
    ]
    assert results["panel_runs"] == 2


@pytest.mark.slow
def test_live_plot_updates_its_output_in_place_in_a_kernel():
    """Many live redraws in a real kernel leave one PNG output (updated through its display id), not a pile."""
    from nbclient import NotebookClient

    code = """
from v3kit.notebook.live import LivePlot, live_default
assert live_default()  # in a kernel, live by default
plot = LivePlot(every_steps=1, every_seconds=0.0, max_overhead=1.0)
plot.on_stage_start("sft", 12, {"epochs": 1, "steps_per_epoch": 12})
for s in range(1, 13):
    plot.on_step({"stage": "sft", "split": "train", "epoch": 1, "step": s, "loss": 1.0 / s})
plot.on_stage_end("sft", None)
print("redraws", plot.redraws)
"""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    NotebookClient(nb, kernel_name=kernel_name(), timeout=120).execute(env=_env(live=True))
    outputs = nb.cells[0].outputs
    assert not [o for o in outputs if o.output_type == "error"], outputs
    assert "redraws 13" in "".join(o.get("text", "") for o in outputs)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1


# ----------------------------------------------------------------------------------------------- sources
def _git_ls(*patterns: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return out.stdout.split()


def test_notebook_sources_are_py_percent_files_and_no_ipynb_is_tracked():
    sources = notebook_tools.source_files(NB_DIR)
    assert {p.stem for p in sources} >= {*OURS, "04_why_grpo_underperforms", "05_your_own_data"}
    problems = [m for p in sources for m in notebook_tools.source_problems(p)]
    assert not problems, "\n".join(problems)
    assert _git_ls("*.ipynb") == [], "generated .ipynb must not be committed (they are git-ignored)"
    ignored = subprocess.run(["git", "check-ignore", "-q", "notebooks/01_sft_load.ipynb"], cwd=ROOT)
    assert ignored.returncode == 0, "notebooks/*.ipynb must be git-ignored"


@pytest.mark.slow
def test_saving_a_run_notebook_then_make_notebooks_changes_only_the_edited_code(tmp_path):
    """What a JupyterLab user does: open the paired .ipynb, run it (outputs, counts, widget state), edit a line,
    save. `make notebooks` (jupytext --sync) then carries the edit into the .py and nothing else: no outputs,
    no run metadata, the same header."""
    src = tmp_path / "01_sft_load.py"
    src.write_text((NB_DIR / "01_sft_load.py").read_text())
    jupytext = [sys.executable, "-m", "jupytext", "--sync", "--quiet"]
    subprocess.run([*jupytext, str(src)], check=True)
    ipynb = src.with_suffix(".ipynb")
    nb = _read(ipynb)
    code = _code_cells(nb)
    for i, cell in enumerate(code):
        cell.execution_count = i + 1
        cell.outputs = [
            nbformat.v4.new_output("stream", text="trained\n"),
            nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo="}),
        ]
        cell.metadata["execution"] = {"iopub.status.idle": "2026-01-01T00:00:00Z"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.2"}
    code[0].source = code[0].source.replace("seed = 0", "seed = 7")
    time.sleep(1.1)  # jupytext compares modification times
    nbformat.write(nb, str(ipynb))
    subprocess.run([*jupytext, str(ipynb)], check=True)
    expected = (NB_DIR / "01_sft_load.py").read_text().replace("\nseed = 0\n", "\nseed = 7\n")
    assert src.read_text() == expected
    assert notebook_tools.source_problems(src) == []


def test_record_and_read_results_round_trip():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x"), nbformat.v4.new_code_cell("y")])
    nb.cells[0].outputs = [
        nbformat.v4.new_output(
            "display_data", data={notebook_tools.RESULT_MIME: {"a": 1, "b": [1, 2]}, "text/plain": ""}
        )
    ]
    nb.cells[1].outputs = [
        nbformat.v4.new_output("stream", text="noise"),
        nbformat.v4.new_output("display_data", data={notebook_tools.RESULT_MIME: {"a": 2}, "text/plain": ""}),
    ]
    assert notebook_tools.read_results(nb) == {"a": 2, "b": [1, 2]}


def test_check_command_flags_a_bad_source(tmp_path):
    bad = tmp_path / "09_bad.py"
    bad.write_text("# %%\nx = 1\n")
    assert notebook_tools.main(["check", str(bad)]) == 1
    assert notebook_tools.main(["check"]) == 0  # the repository's own sources


def test_every_notebook_has_one_parameters_cell_with_smoke_and_run_dir():
    import jupytext

    for name in OURS:
        nb = jupytext.read(NB_DIR / f"{name}.py")
        params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1
        names = set(re.findall(r"^(\w+)\s*=", params[0].source, flags=re.M))
        assert {"smoke", "run_dir", "seed", "n_queries", "sft_epochs"} <= names, name
        if name == "01_sft_load":
            assert "sft_checkpoint" in names


def test_relative_run_dir_resolves_against_the_repository(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert notebook_tools.resolve_run_dir("runs/notebooks") == ROOT / "runs" / "notebooks"
    assert notebook_tools.resolve_run_dir(tmp_path / "x") == tmp_path / "x"
    assert notebook_tools.notebook_config(run_dir="runs/nb").run_dir == str(ROOT / "runs" / "nb")
    # Notebook 05's data file and model class: a file target's path resolves too, a module target stays as given.
    assert notebook_tools.resolve_path("data/t.parquet") == ROOT / "data" / "t.parquet"
    assert notebook_tools.resolve_target("examples/m.py:Net") == f"{ROOT / 'examples' / 'm.py'}:Net"
    assert notebook_tools.resolve_target(f"{tmp_path}/m.py:Net") == f"{tmp_path}/m.py:Net"
    assert notebook_tools.resolve_target("mypkg.models:Net") == "mypkg.models:Net"


# ----------------------------------------------------------------------------------------------- stage reuse
def test_ensure_stages_reuse_and_invalidate(tmp_path):
    from v3kit.pipeline import prepare_data
    from v3kit.stage_reuse import ensure_rce, ensure_stage1

    kw = dict(run_dir=str(tmp_path), smoke=True, n_queries=60, sft_epochs=1, rce_epochs=1)
    cfg = notebook_tools.notebook_config(**kw)
    splits = prepare_data(cfg)
    stage1 = ensure_stage1(cfg, splits)
    assert stage1.origin == "trained"
    ensure_rce(cfg, splits, stage1)
    assert (tmp_path / "rce_epoch1.pt").exists()

    stage1 = ensure_stage1(cfg, splits)
    rce = ensure_rce(cfg, splits, stage1)
    assert stage1.origin == "reused" and rce.info["origin"] == "reused"
    assert rce.history["stage"].eq("rce").all() and len(rce.eval_history) == 2  # logged history comes back

    cfg2 = notebook_tools.notebook_config(**{**kw, "sft_epochs": 2})  # another SFT: RCE output is stale
    assert ensure_stage1(cfg2, splits).origin == "trained"
    assert not (tmp_path / "rce_epoch1.pt").exists()
    assert "rce" not in set(pd.read_csv(tmp_path / "metrics.csv")["stage"])

    # A given checkpoint is copied in and later notebooks (no sft_checkpoint) accept it.
    other = tmp_path / "mine.pt"
    other.write_bytes((tmp_path / "sft.pt").read_bytes())
    assert ensure_stage1(cfg, splits, sft_checkpoint=other).origin == "given"
    assert ensure_stage1(cfg, splits).origin == "reused"


def test_notebook_config_smoke_defaults_and_validation():
    cfg = notebook_tools.notebook_config(smoke=True, n_queries=123, grpo={"kl_beta": 0.0})
    assert cfg.data.synthetic.n_queries == 123 and cfg.sft.epochs == notebook_tools.SMOKE["sft_epochs"]
    assert cfg.grpo.kl_beta == 0.0 and cfg.progress is False
    full = notebook_tools.notebook_config()
    assert full.data.synthetic.n_queries == 3000 and full.grpo.epochs == 8 and full.rce.lr == 1e-5
    with pytest.raises(ValueError, match="old_policy"):
        notebook_tools.notebook_config(grpo={"old_policy": "stale"})


# ----------------------------------------------------------------------------------------------- packaging
def _name_spec(req: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", req)
    assert m, req
    return m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")


def test_environment_yml_lists_the_notebooks_extra():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extra = dict(_name_spec(r) for r in pyproject["project"]["optional-dependencies"]["notebooks"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = dict(_name_spec(d) for d in env["dependencies"] if isinstance(d, str))
    assert {"python", "pip"} <= set(conda)
    assert {k: v for k, v in conda.items() if k not in ("python", "pip")} == extra
    pip = [d for d in env["dependencies"] if isinstance(d, dict)][0]["pip"]
    assert any(
        re.fullmatch(r"-e\s+\.\[(.*)\]", p)
        and {"notebooks", "dev"} <= set(re.fullmatch(r"-e\s+\.\[(.*)\]", p).group(1).split(","))
        for p in pip
    )


@pytest.mark.slow
def test_notebook_command_runs_a_py_source_with_parameters(tmp_path):
    """docs/your_model.md's CI command, verbatim plus smoke sizes: papermill runs notebook 03 from its .py."""
    import shlex

    from v3kit.cli import main
    from v3kit.train.checkpoint import load_checkpoint

    doc = (ROOT / "docs" / "your_model.md").read_text()
    line = next(x for x in doc.splitlines() if x.startswith("v3kit notebook "))
    cmd = shlex.split(line.replace("runs/any_ranker", str(tmp_path)))
    assert cmd[:3] == ["v3kit", "notebook", "03_grpo"] and ["-p", "kl_beta", "0.01"] == cmd[6:9]
    run_dir = tmp_path / "run"
    fast = [
        "-p",
        "run_dir",
        str(run_dir),
        "-p",
        "n_queries",
        "120",
        "-p",
        "sft_epochs",
        "1",
        "-p",
        "rce_epochs",
        "1",
        "-p",
        "grpo_epochs",
        "1",
        "-p",
        "kl_betas",
        "[0.0]",
        "-k",
        kernel_name(),
    ]
    assert main([*cmd[1:], *fast]) == 0
    nb = _read(tmp_path / "03_grpo.ipynb")
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "kl_beta = 0.01" in injected[0].source and "kl_betas = [0.0]" in injected[0].source
    assert load_checkpoint(run_dir / "grpo_epoch1.pt")["config"]["kl_beta"] == 0.01  # the value reached GRPO


def test_notebook_command_parses_values_as_papermill_and_names_unknown_parameters(tmp_path):
    parse = notebook_tools.parse_parameter
    assert [parse(v) for v in ("True", "0.01", "None", "3", "abc", "[0.0, 0.1]")] == [
        True,
        0.01,
        None,
        3,
        "abc",
        [0.0, 0.1],
    ]
    with pytest.raises(ValueError, match=r"has no parameter\(s\) \['kl_bta'\]"):
        notebook_tools.run_notebook("03", {"kl_bta": 0.1}, tmp_path / "x.ipynb")
    with pytest.raises(ValueError, match="no notebook '99_nope'"):
        notebook_tools.notebook_source("99_nope")


@pytest.mark.slow
def test_notebook_stages_and_the_panel_use_the_configured_device(tmp_path, monkeypatch):
    """ensure_stage1 / ensure_rce / the GRPO panel resolve cfg.device through Run, as `v3kit run` does (a fake
    device here)."""
    import torch

    import v3kit.notebook.grpo_panel as gp
    import v3kit.pipeline as pl
    import v3kit.run as run
    import v3kit.stage_reuse as sr
    from v3kit.train.device import num_threads

    fake = torch.device("cuda", 3)
    monkeypatch.setattr(run, "resolve_device", lambda setting: fake)
    seen = []

    def spy(module, name):
        real = getattr(module, name)

        def run_on_cpu(*args, **kwargs):
            seen.append((name, kwargs.get("device")))
            return real(*args, **{**kwargs, "device": "cpu"})

        monkeypatch.setattr(module, name, run_on_cpu)

    for name in ("train_sft", "load_sft", "run_rce", "run_grpo"):  # every stage goes through v3kit.run.Run
        spy(run, name)
    cfg = notebook_tools.notebook_config(
        run_dir=str(tmp_path), smoke=True, n_queries=60, sft_epochs=1, rce_epochs=1, grpo_epochs=1
    )
    with num_threads(2):
        splits = pl.prepare_data(cfg)
        stage1 = sr.ensure_stage1(cfg, splits)
        rce = sr.ensure_rce(cfg, splits, stage1)
        panel = gp.ComparePanel(gp.GRPOStart.from_stages(cfg, splits, stage1, rce.model), live=False)
        panel.run()
        assert torch.get_num_threads() == 1  # threads=auto off the CPU: 1, as `v3kit run` sets it
    assert [n for n, _ in seen] == ["train_sft", "load_sft", "run_rce", "run_grpo"]
    assert all(device == fake for _, device in seen), seen


@pytest.mark.slow
def test_first_panel_click_after_run_all_costs_what_later_clicks_cost(tmp_path):
    """Notebook 03 in a kernel started as JupyterLab starts it (no OMP_NUM_THREADS: torch would take one thread
    per core), every cell run in order, then the panel's Run button clicked twice through its widget comm. The
    kit sets the config's threads (``auto``: 1 on <= 2 cores or for a small model); with torch's default instead,
    a loaded 2-core machine made the first click 25 s against 2-3.5 s later."""
    from jupyter_client.manager import start_new_kernel

    from v3kit.train.device import resolve_threads

    params = {
        "smoke": True,
        "run_dir": str(tmp_path / "run"),
        "n_queries": 120,
        "sft_epochs": 1,
        "rce_epochs": 1,
        "kl_betas": [0.0],
    }
    env = _env(live=True)
    env.pop("OMP_NUM_THREADS", None)
    km, kc = start_new_kernel(kernel_name=kernel_name(), env=env, cwd=str(NB_DIR))
    try:

        def execute(code: str, **kw) -> dict:
            reply = kc.execute_interactive(code, timeout=300, output_hook=lambda msg: None, **kw)
            assert reply["content"]["status"] == "ok", reply["content"]
            return reply["content"]

        def value(expr: str) -> str:
            return execute("", user_expressions={"v": expr})["user_expressions"]["v"]["data"]["text/plain"]

        nb = notebook_tools._jupytext().read(str(NB_DIR / "03_grpo.py"))
        for cell in _code_cells(nb):
            extra = (
                "".join(f"\n{k} = {v!r}" for k, v in params.items())
                if "parameters" in cell.metadata.get("tags", [])
                else ""
            )
            execute(cell.source + extra)
        button = value("panel.button.model_id").strip("'")
        seconds = []
        for _ in range(2):
            n = int(value("len(panel.runs)"))
            kc.shell_channel.send(
                kc.session.msg(
                    "comm_msg", {"comm_id": button, "data": {"method": "custom", "content": {"event": "click"}}}
                )
            )
            deadline = time.monotonic() + 300
            while int(value("len(panel.runs)")) == n:
                assert time.monotonic() < deadline, "the click never finished a run"
                time.sleep(0.05)
            seconds.append(float(value("panel.runs[-1].seconds")))
        threads = int(value("__import__('torch').get_num_threads()"))
        grid = float(value("panel.runs[0].seconds"))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert threads == resolve_threads("auto", __import__("torch").device("cpu"), 10_000)  # a small model: 1
    first, second = seconds
    assert first <= 3 * max(second, grid) + 2.0, f"first click {first:.1f} s, second {second:.1f} s, grid {grid:.1f} s"
