"""Hostile input against the newer surfaces (investigate, ablate, the data cache, notebooks) and the bounds of every
number a config or a command line takes: each case is one line on stderr, the right exit code and no partial file.
Full disks are simulated (``FullDisk`` from ``test_hostile``, an ENOSPC from ``posix_fallocate``) and, where this
machine lets the test mount one, real (a small tmpfs)."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_hostile import FullDisk, _can_mount_tmpfs, _same_splits, _splits, cli, leftovers, needs_proc, one_line

from v3kit.cli import build_parser, main
from v3kit.config import ConfigError, RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["progress=false", "data.synthetic.n_queries=120", "sft.epochs=1", "rce.epochs=1", "grpo.epochs=1"]
FAST = ["sft.epochs=1", "rce.epochs=1", "grpo.epochs=1"]  # investigate's --set: every run of its grid


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from v3kit.pipeline import run_pipeline

    run = tmp_path_factory.mktemp("hostile_run") / "run"
    run_pipeline(load_config(None, [*SMOKE, f"run_dir={run}"]))
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# ============================================================================================== full disks
@pytest.fixture
def data_file(tmp_path):
    from v3kit.data import to_long_frame
    from v3kit.data.synthetic import SyntheticConfig, make_world

    path = tmp_path / "data.parquet"
    to_long_frame(make_world(SyntheticConfig(n_queries=240, seed=4))).to_parquet(path)
    return path


def test_a_split_cache_on_a_full_disk_splits_in_memory_with_a_note(data_file, capsys, monkeypatch):
    """The split cache is written through memory maps: its blocks are allocated first, so a full disk is an ENOSPC
    (then the split is made in memory, with a note) instead of a SIGBUS when a page cannot be backed."""
    reference = _splits(data_file, cache=False)
    _splits(data_file, cache=True)  # the packed arrays are cached; the split next
    shutil.rmtree(next(data_file.parent.rglob("split-*")))
    capsys.readouterr()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    got = _splits(data_file, cache=True)
    note = one_line(capsys.readouterr().err)
    assert note.startswith("v3kit: note: cannot write the split cache") and "in memory" in note, note
    _same_splits(got, reference)
    assert not leftovers(data_file.parent) and not list(data_file.parent.rglob("split-*"))


@pytest.mark.slow
def test_a_real_full_tmpfs_under_the_data_cache_is_no_bus_error(tmp_path, data_file):
    """The probe: a tmpfs holding the table with room for the packed arrays but not the split; ``v3kit run`` with
    ``data.cache=true`` used to die with "Bus error" (exit 135) and leave ``.building-*`` behind."""
    mnt = tmp_path / "mnt"
    _splits(data_file, cache=True)  # measure what the cache needs on this machine
    cache = next(data_file.parent.glob("*.v3kit-cache"))
    split = next(cache.rglob("split-*"))
    split_kb = sum(p.stat().st_size for p in split.rglob("*") if p.is_file()) // 1024
    packed_kb = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) // 1024 - split_kb
    size_kb = data_file.stat().st_size // 1024 + packed_kb + split_kb // 2 + 64
    if not _can_mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs here (needs root); the injected ENOSPC test covers the same path")
    try:
        subprocess.run(["mount", "-o", f"remount,size={size_kb}k", str(mnt)], check=True)
        table = mnt / "data.parquet"
        shutil.copy(data_file, table)
        run = tmp_path / "run"
        sets = [f"data.path={table}", "data.cache=true", f"run_dir={run}", *SMOKE[:1], *FAST, "rce.epochs=0"]
        proc = subprocess.run(
            [sys.executable, "-m", "v3kit", "run", *[a for s in sets for a in ("--set", s)]],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
            timeout=300,
        )
        assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])  # 135: Bus error
        notes = [ln for ln in proc.stderr.splitlines() if ln.startswith("v3kit: note:")]
        assert len(notes) == 1 and "cannot write the split cache" in notes[0], proc.stderr[-2000:]
        assert not leftovers(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@needs_proc
def test_investigate_on_a_full_disk_ends_in_one_line(finished_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    FullDisk(monkeypatch, out, 30_000)  # the first files fit, then the disk is full
    code, _, err = cli(
        capsys,
        "investigate",
        str(finished_run),
        "--out",
        str(out),
        "--trials",
        "2",
        "--confirm-seeds",
        "2",
        "--top-k",
        "1",
        "--no-progress",
        *[a for s in FAST for a in ("--set", s)],
    )
    line = one_line(err)
    assert code == 2 and "no space left on device" in line and "rerun the same command" in line, line
    assert f"{out}/" in line and not leftovers(out)  # a file of the search hit it: the search stopped there


@needs_proc
def test_ablate_on_a_full_disk_ends_in_one_line(tmp_path, capsys, monkeypatch):
    import yaml

    grid = tmp_path / "g.yaml"
    base = ["data.synthetic.n_queries=80", *FAST]
    variants = {"sft_only": ["rce.epochs=0", "grpo.epochs=0"], "seed": []}
    grid.write_text(yaml.safe_dump({"name": "full", "base": base, "seeds": [0, 1], "variants": variants}))
    out = tmp_path / "out"
    FullDisk(monkeypatch, out, 200_000)  # the shared SFT fits, a run's checkpoint does not
    code, _, err = cli(capsys, "ablate", "--grid", str(grid), "--out", str(out), "--no-progress")
    line = one_line(err)
    assert code == 2 and "no space left on device" in line and "rerun the same command" in line, line
    assert f"{out}/default/seed" in line and not leftovers(out)


def test_a_disk_full_error_survives_a_worker_process_whole():
    import pickle

    from v3kit.rundir import DiskFullError, as_disk_full

    e = pickle.loads(pickle.dumps(DiskFullError("/d/run/sft.pt", 4096, 10)))
    assert (e.filename, e.needed, e.free, e.errno) == ("/d/run/sft.pt", 4096, 10, errno.ENOSPC)
    wrapped = RuntimeError("run failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device", "/d/x.csv")
    assert as_disk_full(wrapped).filename == "/d/x.csv" and as_disk_full(RuntimeError("other")) is None


def test_a_checkpoints_size_is_counted_only_when_a_write_fails(tmp_path, monkeypatch):
    """``atomic_write``'s ``size_hint`` may be what counts the bytes (a checkpoint's count walks its payload): it is
    called only for the error of a failed write, whose message then names the bytes needed."""
    from v3kit import rundir
    from v3kit.rundir import DiskFullError, atomic_write

    counted = []

    def size() -> int:
        counted.append(1)
        return 4096

    atomic_write(tmp_path / "ok.bin", lambda f: f.write(b"x"), size_hint=size)
    assert counted == [] and (tmp_path / "ok.bin").read_bytes() == b"x"
    monkeypatch.setattr(rundir, "free_bytes", lambda path: 100)

    def torn(f) -> None:  # torch.save's zip writer reports a full disk as a RuntimeError
        raise RuntimeError("PytorchStreamWriter failed writing file data/0")

    with pytest.raises(DiskFullError) as info:
        atomic_write(tmp_path / "big.pt", torn, size_hint=size)
    assert counted == [1] and (info.value.needed, info.value.free) == (4096, 100)
    assert not (tmp_path / "big.pt").exists() and not list(tmp_path.glob(".big.pt.*"))


@needs_proc
def test_import_sft_on_a_full_disk_ends_in_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from v3kit.train.model import ModelConfig, build_model

    torch.save(build_model(ModelConfig(), 4, 4).state_dict(), tmp_path / "sd.pt")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    FullDisk(monkeypatch, out_dir, 1_000)
    args = ["--target", "v3kit.model:TwoTower", "--state-dict", str(tmp_path / "sd.pt"), "--out"]
    code, _, err = cli(capsys, "import-sft", *args, str(out_dir / "sft.pt"), "--query-dim", "4", "--cand-dim", "4")
    line = one_line(err)
    assert code == 2 and f"{out_dir / 'sft.pt'}: no space left on device" in line and "free space" in line, line
    assert not list(out_dir.iterdir())


@needs_proc
def test_the_builtin_table_cache_on_a_full_disk_uses_the_table_with_a_note(tmp_path, capsys, monkeypatch):
    from v3kit.data import stdlib_search

    frame = pd.DataFrame({"query_id": ["q"] * 2, "candidate_id": ["a", "b"], "reward": [1.0, 0.0]})
    monkeypatch.setattr(stdlib_search, "build_table", lambda cfg: frame)
    FullDisk(monkeypatch, tmp_path, 0)
    got = stdlib_search.builtin_table(stdlib_search.StdlibSearchConfig(), tmp_path)
    note = one_line(capsys.readouterr().err)
    assert got is frame and note.startswith("v3kit: note: cannot write the table cache") and "no space" in note
    assert not list(tmp_path.iterdir())


# ============================================================================================== investigate's options
@pytest.mark.parametrize(
    "option, value, needle",
    [
        ("--budget-minutes", "-5", "argument --budget-minutes: must be in [0, 1e+06], got -5"),
        ("--budget-minutes", "nan", "argument --budget-minutes: must be in [0, 1e+06], got nan"),
        ("--budget-minutes", "inf", "argument --budget-minutes: must be in [0, 1e+06], got inf"),
        ("--reproduce", "-1", "argument --reproduce: must be in [1, 1000], got -1"),
        ("--reproduce", "0", "argument --reproduce: must be in [1, 1000], got 0"),
    ],
)
def test_investigate_refuses_a_bad_budget_or_reproduce_count_before_running(tmp_path, capsys, option, value, needle):
    out = tmp_path / "out"
    code, _, err = cli(capsys, "investigate", str(tmp_path / "run"), "--out", str(out), option, value)
    line = one_line(err)
    assert code == 2 and line.startswith("v3kit investigate: error: ") and needle in line, line
    assert not out.exists()


def test_investigate_api_refuses_a_non_finite_budget(finished_run):
    from v3kit.doctor.investigate import Investigation, reproduce

    for bad in (math.nan, math.inf, -5.0):
        with pytest.raises(ConfigError, match="--budget-minutes must be a finite number >= 0"):
            Investigation(finished_run, budget_minutes=bad)
    with pytest.raises(ValueError, match="at least one seed"):
        reproduce(finished_run, [])


def test_verdict_json_never_holds_nan(tmp_path):
    from v3kit.rundir import json_text

    text = json_text({"mean": math.nan, "effects": [], "interval": [0.1, math.inf], "table": [{"acc@1": -math.inf}]})

    def refuse(name):
        raise AssertionError(f"{name} is not JSON")

    data = json.loads(text, parse_constant=refuse)  # strict: NaN/Infinity are refused
    assert data == {"mean": None, "effects": [], "interval": [0.1, None], "table": [{"acc@1": None}]}


# ============================================================================================== rewards
def _reward_table(path: Path, huge: float) -> None:
    from v3kit.data import to_long_frame
    from v3kit.data.synthetic import SyntheticConfig, make_world

    df = to_long_frame(make_world(SyntheticConfig(n_queries=60, seed=1, group_size=3, min_group_size=3)))
    first = df["query_id"] == df["query_id"].iloc[0]
    df.loc[first, "reward"] = [huge, -huge, 0.0]
    df.to_parquet(path)


def test_rewards_of_1e20_in_a_table_get_their_float64_advantages(tmp_path):
    from v3kit.data.tables import load_groups
    from v3kit.train.grpo import GRPOConfig, per_group_terms

    _reward_table(tmp_path / "t.parquet", 1e20)
    data = load_groups(tmp_path / "t.parquet")
    b = data.query_ids.index(str(pd.read_parquet(tmp_path / "t.parquet")["query_id"].iloc[0]))
    zero, adv = per_group_terms(data.rewards, data.mask, GRPOConfig())
    r = data.rewards[b].double().tolist()  # float64 by hand: mean 0, Bessel std 1e20
    mean = sum(r) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / 2)
    assert not bool(zero[b])
    assert adv[b].tolist() == pytest.approx([(x - mean) / (std + 1e-4) for x in r], abs=1e-6)
    assert adv[b].tolist() == pytest.approx([1.0, -1.0, 0.0], abs=1e-6)  # was [0, 0, 0]


def test_rewards_too_large_even_for_that_are_refused_at_load_naming_the_column(tmp_path, capsys):
    _reward_table(tmp_path / "t.parquet", 1e31)
    run = tmp_path / "run"
    code, _, err = cli(capsys, "run", "--set", f"data.path={tmp_path / 't.parquet'}", "--set", f"run_dir={run}")
    line = one_line(err)
    assert code == 2 and "reward = 1e+31 exceeds |reward| <= 1e+30" in line and "rescale the reward column" in line
    assert not run.exists()


def test_in_memory_rewards_too_large_are_refused_naming_the_field():
    from v3kit.data import DataValidationError, validate_tensors
    from v3kit.data.synthetic import SyntheticConfig, make_world

    data = make_world(SyntheticConfig(n_queries=20, seed=0))
    validate_tensors(data.with_rewards(data.rewards * 0 + 1e30))  # at the bound: fine
    with pytest.raises(
        DataValidationError, match=r"^rewards has 1e\+31 at index \[3, 1\], beyond \|rewards\| <= 1e\+30"
    ):
        big = data.rewards.clone()
        big[3, 1] = 1e31
        validate_tensors(data.with_rewards(big))


# ============================================================================================== bounds
def _number_keys(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, type]]:
    """Every config key that takes a number (int or float, also inside Optional/Union/list), from the dataclasses."""
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            keys += _number_keys(hint, key + ".")
            continue
        args = typing.get_args(hint) if typing.get_origin(hint) is not list else ()
        inner = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        if hint is float or float in args:
            keys.append((key, float))
        elif hint is int or int in args:
            keys.append((key, int))
        elif inner in (int, float):
            keys.append((key, list))
    return keys


def test_the_walk_finds_the_fields_that_were_unbounded():
    keys = dict(_number_keys())
    for key in ("grpo.kl_horizon", "log_every", "reward.debias_folds", "data.text_max_tokens", "grpo.adv_eps"):
        assert key in keys
    assert keys["threads"] is int and keys["sft.lr"] is float and keys["model.hidden"] is list
    assert len(keys) >= 50


@pytest.mark.parametrize("sign", ["", "-"])
def test_every_numeric_config_key_refuses_an_extreme_value_naming_the_key(sign):
    for key, kind in _number_keys():
        value = {float: f"{sign}1e300", int: f"{sign}{10**20}", list: f"[{sign}{10**20}]"}[kind]
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"{key}={value}"])
        msg = str(e.value)
        # the key leads, or (a rule between two fields) the field's name is in the line
        named = msg.startswith(key) or key.rsplit(".", 1)[-1] in msg
        assert named and "\n" not in msg and "Traceback" not in msg, (key, msg)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("sft.lr=1e300", "sft.lr must be within +-1e+06"),
        ("grpo.kl_beta=1e30", "grpo.kl_beta must be within +-1e+06"),
        ("rce.t_start=1e-300", "rce.t_start must be in [1e-06, 1e+06]"),
        ("rce.t_start=1e300", "rce.t_start must be within +-1e+06"),
        ("model.sim_temperature=1e-9", "model.sim_temperature must be in [1e-06, 1e+06]"),
        ("grpo.logp_temperature=1e-9", "grpo.logp_temperature must be in [1e-06, 1e+06]"),
        (f"grpo.kl_horizon={10**12 + 1}", "grpo.kl_horizon must be <= 1_000_000_000_000"),
        (f"log_every={10**9 + 1}", "log_every must be <= 1_000_000_000"),
        ("reward.debias_folds=1001", "reward.debias_folds must be <= 1_000"),
        ("data.text_max_tokens=100001", "data.text_max_tokens must be <= 100_000"),
        ("grpo.adv_eps=1e7", "grpo.adv_eps must be within +-1e+06"),
        ("threads=4097", "threads must be 'auto' or an integer in [1, 4096]"),
        (f"threads={10**20}", "threads must be 'auto' or an integer in [1, 4096], got 1000"),
        ("sft.lr=" + "9" * 400, "sft.lr must be a finite number"),
    ],
)
def test_extreme_values_fail_at_load_in_one_line_naming_their_key(tmp_path, capsys, override, needle):
    run = tmp_path / "run"
    code, _, err = cli(capsys, "run", "--set", override, "--set", f"run_dir={run}", "--set", "progress=false")
    line = one_line(err)
    assert code == 2 and line.startswith(f"v3kit run: error: {needle}"), line
    assert " lr" not in line.replace("sft.lr", "") and not run.exists()  # never blames the lr of another key


def test_values_at_the_new_bounds_load():
    cfg = load_config(
        None,
        [f"grpo.kl_horizon={10**12}", f"log_every={10**9}", "reward.debias_folds=1000", "data.text_max_tokens=512"]
        + ["sft.lr=1e6", "rce.t_end=1e-6", "threads=4096", "grpo.kl_beta=1e6", "grpo.baseline=-1e6"],
    )
    assert (cfg.grpo.kl_horizon, cfg.log_every, cfg.threads, cfg.rce.t_end) == (10**12, 10**9, 4096, 1e-6)


def test_every_numeric_command_line_option_is_bounded_and_refused_in_one_line(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    checked = 0
    for command, p in sub.choices.items():
        for action in p._actions:
            if action.type in (int, float):
                pytest.fail(f"v3kit {command} {action.option_strings}: a numeric option without bounds")
            bounds = getattr(action.type, "bounds", None)
            if bounds is None or not action.option_strings:
                continue
            opt = action.option_strings[-1]
            for bad in ("nan", "inf", "-inf", "1e300", str(bounds[0] - 1), "x"):
                code = main([command, opt, bad])
                line = one_line(capsys.readouterr().err)
                assert code == 2 and line.startswith(f"v3kit {command}: error: argument {opt}"), line
            checked += 1
    assert checked >= 8  # investigate (5), ablate (1), import-sft (3)


# ============================================================================================== minors
def test_investigate_refuses_a_run_whose_config_was_edited_after_it(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("emb_dim: 32", "emb_dim: 64"))
    code, _, err = cli(capsys, "investigate", str(run), "--out", str(tmp_path / "out"))
    line = one_line(err)
    assert code == 2 and "was edited after the run (model.emb_dim: 32 -> 64)" in line, line
    assert not (tmp_path / "out").exists()
    # keys that change no number (where it ran, how it printed) are not edits
    (run / "config.yaml").write_text(text.replace("progress: false", "progress: true"))
    from v3kit.run_info import config_edits

    assert config_edits(run, load_config(run / "config.yaml")) == ""


def test_a_garbage_metrics_csv_is_one_error_naming_the_file(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    (run / "metrics.csv").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    code, _, err = cli(capsys, "doctor", str(run))
    line = one_line(err)
    assert code == 2 and f"{run / 'metrics.csv'} is not UTF-8 text" in line, line


@pytest.mark.slow  # papermill and jupytext take seconds to import
@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("kl_beta", "abc", "-p kl_beta 'abc': 03_grpo.py expects a number (its default is"),
        ("smoke", "[1,", "-p smoke '[1,': looks like a YAML list/mapping but does not parse ("),
    ],
)
def test_notebook_parameter_errors_are_one_line_naming_the_parameter(tmp_path, capsys, key, value, needle):
    pytest.importorskip("papermill")
    pytest.importorskip("jupytext")
    out = tmp_path / "nb.ipynb"
    code = main(["notebook", "03_grpo", "-p", key, value, "--out", str(out)])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and line.startswith(f"v3kit notebook: error: {needle}"), line
    assert not out.exists()
