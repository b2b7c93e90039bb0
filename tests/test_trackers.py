"""report_to: TensorBoard, MLflow and W&B get every metrics.csv row, the config and the stage table."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import types
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from v3kit.ablate import parse_grid, run_grid
from v3kit.cli import main
from v3kit.config import ConfigError, load_config
from v3kit.pipeline import run_pipeline
from v3kit.trackers import COORDINATES, mlflow_name

TINY = [
    "data.synthetic.n_queries=80",
    "sft.epochs=1",
    "rce.epochs=1",
    "grpo.epochs=2",
    "grpo.lr=1e-3",
    "progress=false",
]


class FakeWandb(types.ModuleType):
    """Records what v3kit calls on ``wandb`` (the call shape; the real package is not needed)."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.runs: list[FakeRun] = []

    def init(self, **kwargs):
        run = FakeRun(kwargs)
        self.runs.append(run)
        return run

    class Table:
        def __init__(self, dataframe):
            self.dataframe = dataframe


class FakeRun:
    def __init__(self, kwargs) -> None:
        self.kwargs, self.id = kwargs, "fake-id"
        self.defined: dict[str, str | None] = {}
        self.logged: list[dict] = []
        self.summary: dict = {}
        self.exit_code = None

    def define_metric(self, name, step_metric=None):
        self.defined[name] = step_metric

    def log(self, values):
        self.logged.append(dict(values))

    def finish(self, exit_code=0):
        self.exit_code = exit_code


def expected(metrics: pd.DataFrame) -> dict[str, dict[int, float]]:
    """``{stage/split/column: {step: value}}`` of every non-empty value of metrics.csv."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for row in metrics.to_dict("records"):
        for k, v in row.items():
            if k not in COORDINATES and not (isinstance(v, float) and math.isnan(v)):
                key = f"{row['stage']}/{row['split']}/{k}"
                assert int(row["step"]) not in out[key]  # one value per name and step
                out[key][int(row["step"])] = float(v)
    return out


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One tiny run reporting to TensorBoard, MLflow (a local file store) and a fake W&B."""
    tmp = tmp_path_factory.mktemp("tracked")
    wandb = FakeWandb()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "wandb", wandb)
        mp.setenv("MLFLOW_TRACKING_URI", (tmp / "mlruns").as_uri())
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        for var in ("WANDB_API_KEY", "WANDB_MODE", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
            mp.delenv(var, raising=False)
        mp.setenv("HOME", str(tmp))  # no ~/.netrc: not logged in to W&B
        cfg = load_config(None, [*TINY, f"run_dir={tmp / 'run'}", "report_to=[tensorboard,mlflow,wandb]"])
        res = run_pipeline(cfg)
        yield res, pd.read_csv(res.run_dir / "metrics.csv"), (tmp / "mlruns").as_uri(), wandb


@pytest.mark.slow
def test_tensorboard_event_files_hold_every_metrics_row(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res, metrics, _, _ = tracked_run
    acc = EventAccumulator(str(res.run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    want = expected(metrics)
    assert {"sft/train/loss", "grpo/train/loss", "grpo/val/acc@1", "rce/val/kl_to_sft"} <= set(want)
    for tag, values in want.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        # TensorBoard keeps float32 scalars
        assert got == {s: float(np.float32(v)) for s, v in values.items()}, tag
    for stage, rec in res.table.iterrows():  # the stage table, at step 0
        assert acc.Scalars(f"{stage}/test/acc@1")[0].value == np.float32(rec["acc@1"])
    assert "config" in " ".join(acc.Tags()["tensors"])  # config text (and hparams)


@pytest.mark.slow
def test_mlflow_store_holds_every_metrics_row_params_and_artifacts(tracked_run):
    import mlflow
    from mlflow.tracking import MlflowClient

    res, metrics, uri, _ = tracked_run
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_ids=["0"])
    assert len(runs) == 1 and runs.loc[0, "status"] == "FINISHED"
    run = runs.iloc[0]
    assert run["params.grpo.kl_beta"] == "0.1" and run["params.report_to"] == '["tensorboard", "mlflow", "wandb"]'
    client = MlflowClient(uri)
    want = expected(metrics)
    assert mlflow_name("grpo/train/clip_ratio/low_mean") == "grpo/train/clip_ratio.low_mean"
    assert mlflow_name("grpo/val/acc@1") == "grpo/val/acc_at_1"
    for key, values in want.items():
        history = client.get_metric_history(run["run_id"], mlflow_name(key))
        assert {m.step: m.value for m in history} == values, key  # float64: exactly the CSV's values
    summary = pd.read_csv(res.run_dir / "summary.csv", index_col=0)
    for stage, rec in summary.iterrows():
        assert run[f"metrics.{stage}/test/acc_at_1"] == rec["acc@1"]
    artifacts = {a.path for a in client.list_artifacts(run["run_id"])}
    assert {"summary.csv", "config.yaml", "checkpoints"} <= artifacts
    ckpts = {a.path for a in client.list_artifacts(run["run_id"], "checkpoints")}
    assert {"checkpoints/sft_epoch1.pt", "checkpoints/rce_epoch1.pt", "checkpoints/grpo_epoch2.pt"} <= ckpts


@pytest.mark.slow
def test_wandb_runs_offline_and_gets_every_row_on_its_stage_axis(tracked_run):
    res, metrics, _, wandb = tracked_run
    (run,) = wandb.runs
    assert run.kwargs["mode"] == "offline" and run.kwargs["dir"] == str(res.run_dir)
    assert run.kwargs["config"]["grpo"]["kl_beta"] == 0.1 and run.exit_code == 0
    assert run.defined["grpo/*"] == "grpo/step"
    got: dict[str, dict[int, float]] = defaultdict(dict)
    for values in run.logged:
        stage_step = [k for k in values if k.endswith("/step") and k.count("/") == 1]
        for k, v in values.items():
            if k not in stage_step and k != "summary":
                got[k][values[stage_step[0]]] = v
    assert dict(got) == expected(metrics)
    assert run.summary["grpo/test/acc@1"] == res.table.loc["grpo", "acc@1"]


def test_grid_runs_are_tracked_runs_tagged_with_grid_variant_and_seed(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    grid = parse_grid(
        {
            "name": "tiny",
            "base": [*TINY[:-1], "grpo.epochs=1", "report_to=[mlflow]"],
            "seeds": [0, 1],
            "reference": "seed",
            "variants": {"sft_only": ["rce.epochs=0", "grpo.epochs=0"], "seed": []},
        }
    )
    res = run_grid(grid, tmp_path / "g", progress=False)
    mlflow.set_tracking_uri((tmp_path / "g" / "mlruns").as_uri())  # a grid's default store: <out>/mlruns
    runs = mlflow.search_runs(experiment_ids=["0"])
    tags = sorted((r["tags.grid"], r["tags.variant"], r["tags.seed"]) for _, r in runs.iterrows())
    assert tags == [("tiny", v, s) for v in ("seed", "sft_only") for s in ("0", "1")]
    final = res.frame[(res.frame["split"] == "test") & (res.frame["stage"] == "grpo")]
    for _, r in runs.iterrows():
        want = final[(final["variant"] == r["tags.variant"]) & (final["seed"] == int(r["tags.seed"]))]["acc@1"]
        assert r["metrics.grpo/test/acc_at_1"] == want.item()
    # report_to is not part of a run's identity: the grid without it has nothing left to run.
    plain = parse_grid(
        {
            "name": "tiny",
            "base": [*TINY[:-1], "grpo.epochs=1"],
            "seeds": [0, 1],
            "reference": "seed",
            "variants": {"sft_only": ["rce.epochs=0", "grpo.epochs=0"], "seed": []},
        }
    )
    assert run_grid(plain, tmp_path / "g", progress=False).executed == 0


def test_report_to_is_checked_and_a_missing_tracker_fails_before_training(tmp_path, monkeypatch, capsys):
    assert load_config(None, ["report_to=[tensorboard,mlflow]"]).report_to == ["tensorboard", "mlflow"]
    assert load_config(None, []).report_to == []
    with pytest.raises(ConfigError, match="report_to.*neptune"):
        load_config(None, ["report_to=[neptune]"])
    monkeypatch.setitem(sys.modules, "mlflow", None)  # not installed
    run_dir = tmp_path / "run"
    code = main(
        ["run", "--set", "data.synthetic.n_queries=80", "--set", f"run_dir={run_dir}", "--set", "report_to=[mlflow]"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pip install -e '.[mlflow]'" in err
    assert not list(run_dir.glob("*.pt")) and not (run_dir / "metrics.csv").exists()


@pytest.mark.slow
def test_mlflow_search_runs_reads_a_kit_run_with_no_setting(tmp_path, monkeypatch, capsys):
    """The default store is MLflow's own (SQLite ./mlflow.db): docs/tracking.md's snippet, as written, reads the run
    in a fresh interpreter with no MLflow variable set."""
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("alembic")
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        None, [*TINY, "sft.epochs=1", "rce.epochs=1", "grpo.epochs=1", "run_dir=run", "report_to=[mlflow]"]
    )
    res = run_pipeline(cfg)
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # nothing set behind the user's back
    assert (tmp_path / "mlflow.db").is_file()  # (MLflow keeps the artifacts beside it, in ./mlruns)
    assert f"mlflow.search_runs() reads them from {tmp_path}" in capsys.readouterr().out
    doc = (Path(__file__).resolve().parents[1] / "docs" / "tracking.md").read_text()
    snippet = re.findall(r"```python\n(.*?)```", doc, flags=re.S)[0]
    check = '\nprint("VALUE", repr(float(runs["metrics.grpo/test/acc_at_1"].iloc[0])), len(runs), len(history))\n'
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run(
        [sys.executable, "-c", snippet + check], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    value, n_runs, n_history = done.stdout.split("VALUE ")[1].split()
    assert float(value) == float(res.table.loc["grpo", "acc@1"]) and n_runs == "1"
    metrics = pd.read_csv(res.run_dir / "metrics.csv")
    assert int(n_history) == int(metrics[(metrics.stage == "grpo") & (metrics.split == "train")]["loss"].notna().sum())


def test_mlflow_falls_back_to_the_file_store_and_says_how_to_read_it(tmp_path, monkeypatch):
    from v3kit import trackers

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(trackers, "mlflow_sql_available", lambda: False)
    uri = trackers.mlflow_uri(tmp_path)
    assert uri == (tmp_path / "mlruns").as_uri()
    hint = trackers.mlflow_read_hint(uri)
    assert "MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri" in hint and "pip install sqlalchemy" in hint
    monkeypatch.setattr(trackers, "mlflow_sql_available", lambda: True)
    assert trackers.mlflow_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert trackers.mlflow_uri(tmp_path, concurrent=True) == uri  # a grid's workers write at once
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert trackers.mlflow_uri(tmp_path) == "http://tracking:5000"
