"""Experiment trackers (``report_to: [tensorboard, mlflow, wandb]``): every ``metrics.csv`` row, the config and
the stage table, sent through the same training callbacks the live plots use.

Names: a row's value ``loss`` of stage ``grpo``, split ``train`` is ``grpo/train/loss`` at the row's ``step`` (the
stage's optimizer step; a ``val`` row sits at the step its epoch ended on, epoch 0 at step 0). The stage is in the
name, not a step offset: the stages' losses are different quantities, each stage's steps start at 0 as in
``metrics.csv``, and a run started from a given SFT checkpoint has no SFT steps to offset by. ``stage``, ``split``,
``epoch`` and ``step`` are coordinates, not values; empty (NaN) cells are not sent. At the end the stage table
(``summary.csv``) is sent as ``<stage>/test/<metric>`` at step 0.

* ``tensorboard``: event files in ``<run_dir>/tensorboard/`` (``tensorboard --logdir runs``); the config as
  hparams and as text, the stage table as text. TensorBoard stores scalars as float32.
* ``mlflow``: the store at ``$MLFLOW_TRACKING_URI``; unset, MLflow's own default for ``v3kit run``: the SQLite
  store ``./mlflow.db`` in the working directory (``mlflow.search_runs()`` there reads it) when MLflow's SQL
  dependencies are installed, else the file store ``./mlruns``; a grid's runs go to the file store
  ``<out>/mlruns`` (one store that its concurrent workers share; SQLite takes one writer at a time). v3kit sets
  ``MLFLOW_ALLOW_FILE_STORE=true`` for itself on a ``file:`` store (MLflow 3 refuses it otherwise), and prints how
  to read and browse the store (:func:`mlflow_read_hint`). Experiment:
  ``$MLFLOW_EXPERIMENT_NAME``, else the default one. MLflow allows no ``@`` in names and its file store keeps names
  as paths, so ``acc@1`` is logged as ``acc_at_1`` and ``clip_ratio/low_mean`` as ``clip_ratio.low_mean``
  (:func:`mlflow_name`). The config as params (dotted keys), each stage's epoch checkpoints as artifacts under
  ``checkpoints/``, ``summary.csv`` and ``config.yaml`` as artifacts.
* ``wandb``: ``wandb.init(dir=run_dir)``, offline (``WANDB_MODE=offline``) unless ``WANDB_MODE`` is set or the
  user is logged in (``WANDB_API_KEY`` or ``wandb login``); project ``$WANDB_PROJECT`` else ``v3kit``. Each stage
  has its own step axis (``<stage>/step``, W&B's ``define_metric``), since W&B steps must only grow.

In an ablation each (world, variant, seed) run is one tracked run, tagged with ``grid``, ``world``, ``variant``
and ``seed``. A ``--resume`` continues the same MLflow / W&B run (ids kept in ``<run_dir>/trackers.json``); rows
between the last checkpoint and a crash are logged again at the same steps. Each tracker is an optional extra; a
missing one fails in one line naming the install command, before anything trains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import json
import math
import netrc
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import yaml

from .provenance import flatten
from .rundir import atomic_write_text

TRACKERS = ("tensorboard", "mlflow", "wandb")
INSTALL = {
    "tensorboard": "pip install -e '.[tensorboard]'",
    "mlflow": "pip install -e '.[mlflow]'",
    "wandb": "pip install -e '.[wandb]'",
}
COORDINATES = ("stage", "split", "epoch", "step")  # where a row sits, not what it measured
IDS_FILE = "trackers.json"


def check_report_to(value: Sequence[str]) -> None:
    """Config-load check of ``report_to`` (names only; whether they are installed is checked when a run starts)."""
    bad = [v for v in value if v not in TRACKERS]
    if bad:
        raise ValueError(
            f"report_to: unknown tracker {bad[0]!r}; choose from {list(TRACKERS)}, e.g. report_to=[tensorboard,mlflow]"
        )
    if len(set(value)) != len(value):
        raise ValueError(f"report_to lists a tracker twice: {list(value)}")


def require(report_to: Sequence[str]) -> None:
    """Import every tracker of ``report_to``; a missing one is an ``ImportError`` naming the install command."""
    for name in report_to:
        try:
            importlib.import_module(name)
        except ImportError:
            raise ImportError(f"report_to={name} needs {name}, which is not installed: {INSTALL[name]}") from None


def mlflow_sql_available() -> bool:
    """MLflow's SQL store dependencies (sqlalchemy, alembic) are installed (``pip install -e '.[mlflow]'``)."""
    return all(importlib.util.find_spec(m) is not None for m in ("sqlalchemy", "alembic"))


def mlflow_uri(default_dir: str | Path | None = None, *, concurrent: bool = False) -> str:
    """``$MLFLOW_TRACKING_URI``, else MLflow's own default: a SQLite store ``<default_dir or cwd>/mlflow.db`` (what
    ``mlflow.search_runs()`` reads from that directory with no setting) when MLflow's SQL dependencies are
    installed, else the file store ``<default_dir or cwd>/mlruns``. ``concurrent`` (a grid's runs, written by
    several processes at once) keeps the file store: SQLite takes one writer at a time."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    base = Path(default_dir or ".").resolve()
    if mlflow_sql_available() and not concurrent:
        return f"sqlite:///{base / 'mlflow.db'}"
    return (base / "mlruns").as_uri()


def mlflow_read_hint(uri: str) -> str:
    """How to read and browse the MLflow store ``uri`` (one line)."""
    if uri.startswith("sqlite:///"):
        where = Path(uri[len("sqlite:///") :]).parent
        return (
            f"MLflow: runs in {uri}; mlflow.search_runs() reads them from {where} as is (MLflow's default store "
            f"there), or mlflow.set_tracking_uri({uri!r}); browse: mlflow ui --backend-store-uri {uri}"
        )
    if uri.startswith("file:"):
        return (
            f"MLflow: runs in the file store {uri}, which MLflow 3 reads only with MLFLOW_ALLOW_FILE_STORE=true: "
            f"mlflow.set_tracking_uri({uri!r}) after os.environ['MLFLOW_ALLOW_FILE_STORE'] = 'true'; browse: "
            f"MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {uri}"
            + ("" if mlflow_sql_available() else "; pip install sqlalchemy alembic for MLflow's default SQLite store")
        )
    return f"MLflow: runs in {uri}; mlflow.set_tracking_uri({uri!r}) reads them"


def mlflow_name(key: str) -> str:
    """A tracker name as MLflow stores it: ``@`` (not allowed) as ``_at_``, and a ``/`` inside the column as ``.``
    (its file store keeps names as paths, where ``clip_ratio`` and ``clip_ratio/low_mean`` would collide)."""
    head, sep, column = (
        key.rpartition("/") if key.count("/") < 2 else ("/".join(key.split("/", 2)[:2]), "/", key.split("/", 2)[2])
    )
    return (head + sep + column.replace("/", ".")).replace("@", "_at_")


def open_mlflow_store(uri: str) -> None:
    """Create the store (and its default experiment) once, before the runs of a grid write to it concurrently."""
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).search_experiments(max_results=1)


def flat_params(tree: Mapping[str, Any]) -> dict[str, Any]:
    """The config as ``{dotted.key: scalar}`` (every mapping flattened, lists as their JSON text, None as ``null``)."""
    return {
        k: json.dumps(v) if isinstance(v, (list, tuple)) or v is None else v for k, v in flatten(tree, whole=()).items()
    }


def row_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The values of one ``metrics.csv`` row under their tracker names (``<stage>/<split>/<column>``)."""
    stage, split = row["stage"], row["split"]
    out = {}
    for k, v in row.items():
        if k in COORDINATES or isinstance(v, (str, bytes)) or v is None:
            continue
        v = float(v)
        if not math.isnan(v):
            out[f"{stage}/{split}/{k}"] = v
    return out


def table_metrics(table: Any) -> dict[str, float]:
    """The stage table (``summary.csv``: a row per stage) as ``<stage>/test/<metric>``."""
    out = {}
    for stage, rec in table.iterrows():
        for k, v in rec.items():
            if v is not None and not math.isnan(float(v)):
                out[f"{stage}/test/{k}"] = float(v)
    return out


# ------------------------------------------------------------------------------------------------ trackers
class _TensorBoard:
    def __init__(
        self, run_dir: Path, params: dict[str, Any], tags: dict[str, str], config_text: str, ids: dict[str, Any]
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        for summary in hparams({**params, **tags}, {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + config_text + "\n```", 0)
        if tags:
            self.writer.add_text("tags", ", ".join(f"{k}={v}" for k, v in tags.items()), 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def checkpoints(self, paths: Sequence[Path]) -> None: ...

    def finish(self, table: Any, summary_csv: Path, config_yaml: Path) -> None:
        self.log(table_metrics(table), 0)
        self.writer.add_text("summary", "```\n" + table.to_string() + "\n```", 0)

    def end(self, ok: bool) -> None:
        self.writer.close()


class _MLflow:
    BATCH = 1000  # MLflow's log_batch limit on metrics (and 100 on params)

    def __init__(
        self,
        run_dir: Path,
        params: dict[str, Any],
        tags: dict[str, str],
        config_text: str,
        ids: dict[str, Any],
        uri: str,
    ) -> None:
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store without it
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = client = MlflowClient(uri)
        self.pending: list[Any] = []
        run_id = ids.get("mlflow_run_id")
        if run_id is not None and ids.get("mlflow_uri") == uri:
            try:
                client.update_run(run_id, status="RUNNING")
            except Exception:  # deleted or in another store: start a new one
                run_id = None
        else:
            run_id = None
        if run_id is None:
            name = tags.get("run") or run_dir.name
            run = client.create_run(self._experiment(), run_name=name, tags={**tags, "v3kit.run_dir": str(run_dir)})
            run_id = run.info.run_id
            items = [Param(self.name(k), str(v)) for k, v in params.items()]
            for i in range(0, len(items), 100):
                client.log_batch(run_id, params=items[i : i + 100])
        ids.update(mlflow_run_id=run_id, mlflow_uri=uri)
        self.run_id = run_id

    def _experiment(self) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
        if not name:
            return os.environ.get("MLFLOW_EXPERIMENT_ID", "0")
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another run of the grid created it first
            return self.client.get_experiment_by_name(name).experiment_id

    @staticmethod
    def name(key: str) -> str:
        return mlflow_name(key)

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(self.name(k), v, now, step) for k, v in metrics.items()]
        if len(self.pending) >= 200:  # one store write per ~10 steps instead of one per value
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self.pending), self.BATCH):
            self.client.log_batch(self.run_id, metrics=self.pending[i : i + self.BATCH])
        self.pending = []

    def checkpoints(self, paths: Sequence[Path]) -> None:
        self.flush()
        for p in paths:
            self.client.log_artifact(self.run_id, str(p), artifact_path="checkpoints")

    def finish(self, table: Any, summary_csv: Path, config_yaml: Path) -> None:
        self.log(table_metrics(table), 0)
        self.flush()
        for p in (summary_csv, config_yaml):
            if p.exists():
                self.client.log_artifact(self.run_id, str(p))

    def end(self, ok: bool) -> None:
        with contextlib.suppress(Exception) if not ok else contextlib.nullcontext():
            self.flush()
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True

    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class _WandB:
    def __init__(
        self,
        run_dir: Path,
        params: dict[str, Any],
        tags: dict[str, str],
        config_text: str,
        ids: dict[str, Any],
        config: dict[str, Any],
    ) -> None:
        import wandb

        self.wandb = wandb
        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_logged_in() else "offline")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "v3kit"),
            dir=str(run_dir),
            mode=mode,
            name=tags.get("run") or run_dir.name,
            group=tags.get("grid"),
            config=config,
            tags=[f"{k}={v}" for k, v in tags.items() if k != "run"],
            id=ids.get("wandb_id"),
            resume="allow",
        )
        ids["wandb_id"] = self.run.id
        self.stages: set[str] = set()

    def log(self, metrics: dict[str, float], step: int) -> None:
        by_stage: dict[str, dict[str, float]] = {}
        for k, v in metrics.items():
            by_stage.setdefault(k.split("/", 1)[0], {})[k] = v
        for stage, values in by_stage.items():
            if stage not in self.stages:  # each stage's steps start at 0: its own x axis
                self.run.define_metric(f"{stage}/step")
                self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
                self.stages.add(stage)
            self.run.log({f"{stage}/step": step, **values})

    def checkpoints(self, paths: Sequence[Path]) -> None: ...

    def finish(self, table: Any, summary_csv: Path, config_yaml: Path) -> None:
        self.run.summary.update(table_metrics(table))
        self.run.log({"summary": self.wandb.Table(dataframe=table.reset_index())})

    def end(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


# ------------------------------------------------------------------------------------------------ the callback
class Reporter:
    """A :class:`v3kit.train.training.Callback` that sends every logged row to the run's trackers (none: does
    nothing)."""

    def __init__(
        self, trackers: Sequence[Any] = (), ids_path: Path | None = None, ids: dict[str, Any] | None = None
    ) -> None:
        self.trackers = list(trackers)
        self.ids_path, self.ids = ids_path, ids or {}

    def callbacks(self) -> list[Any]:
        return [self] if self.trackers else []

    def _log(self, row: Mapping[str, Any]) -> None:
        metrics = row_metrics(row)
        for t in self.trackers:
            t.log(metrics, int(row["step"]))

    def on_step(self, row: dict[str, Any]) -> None:
        self._log(row)

    def on_eval(self, row: dict[str, Any]) -> None:
        self._log(row)

    def on_stage_end(self, stage: str, result: Any) -> None:
        paths = [Path(p) for p in getattr(result, "checkpoints", []) or [] if Path(p).exists()]
        for t in self.trackers:
            t.checkpoints(paths)

    def finish(self, table: Any, run_dir: str | Path) -> None:
        """The stage table and ``summary.csv`` (the run's end)."""
        run_dir = Path(run_dir)
        for t in self.trackers:
            t.finish(table, run_dir / "summary.csv", run_dir / "config.yaml")

    def end(self, ok: bool) -> None:
        for t in self.trackers:
            t.end(ok)


def start(
    cfg: Any, run_dir: str | Path, *, resume: bool = False, tracking: Mapping[str, Any] | None = None
) -> Reporter:
    """The :class:`Reporter` of ``cfg.report_to`` for a run in ``run_dir`` (checks the extras first).

    ``tracking``: ``tags`` (an ablation's grid, world, variant, seed; ``run``: the tracked run's name) and
    ``mlflow_uri`` (the store when ``$MLFLOW_TRACKING_URI`` is unset).
    """
    report_to = list(getattr(cfg, "report_to", []) or [])
    if not report_to:
        return Reporter()
    require(report_to)
    run_dir = Path(run_dir)
    tracking = dict(tracking or {})
    tags = {k: str(v) for k, v in (tracking.get("tags") or {}).items()}
    config = dataclasses.asdict(cfg)  # the run config (any config dataclass) as nested plain values
    params = flat_params(config)
    config_text = yaml.safe_dump(config, sort_keys=False)
    ids_path = run_dir / IDS_FILE
    ids: dict[str, Any] = {}
    if resume and ids_path.exists():
        with contextlib.suppress(OSError, ValueError):
            ids = json.loads(ids_path.read_text())
    made: list[Any] = []
    try:
        for name in report_to:
            if name == "tensorboard":
                made.append(_TensorBoard(run_dir, params, tags, config_text, ids))
            elif name == "mlflow":
                uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking.get("mlflow_uri") or mlflow_uri()
                made.append(_MLflow(run_dir, params, tags, config_text, ids, uri))
                if not tracking.get("mlflow_uri"):  # a grid says it once, not once per run
                    print(mlflow_read_hint(uri), flush=True)
            else:
                made.append(_WandB(run_dir, params, tags, config_text, ids, config))
    except BaseException:
        for t in made:
            with contextlib.suppress(Exception):
                t.end(False)
        raise

    if ids:  # what a --resume continues
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(ids_path, json.dumps(ids, indent=1) + "\n")
    return Reporter(made, ids_path, ids)


@contextlib.contextmanager
def reporting(
    cfg: Any,
    run_dir: str | Path,
    *,
    resume: bool = False,
    tracking: Mapping[str, Any] | None = None,
    active: bool = True,
) -> Iterator[Reporter]:
    """:func:`start` for the block; the tracked runs end FINISHED, or FAILED when the block raises."""
    reporter = start(cfg, run_dir, resume=resume, tracking=tracking) if active else Reporter()
    try:
        yield reporter
    except BaseException:
        with contextlib.suppress(Exception):
            reporter.end(False)
        raise
    reporter.end(True)
