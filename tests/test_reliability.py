"""Bad input refused with one clear line, at the earliest point: config values, data rows, checkpoints, CLI."""

from __future__ import annotations

import dataclasses

import pytest

from v3kit.config import ConfigError, RunConfig, all_keys, load_config


def _float_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every config key whose type admits a float, found from the dataclass tree (not a hand-kept list)."""
    import typing

    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += _float_keys(hint, f"{prefix}{name}.")
        elif hint is float or float in typing.get_args(hint):
            keys.append(f"{prefix}{name}")
    return keys


def test_float_keys_cover_the_ones_that_trained_to_nan():
    keys = _float_keys()
    assert {"grpo.lr", "grpo.kl_beta", "grpo.baseline", "grpo.adv_eps", "rce.t_end"} <= set(keys)
    assert set(keys) <= set(all_keys())


@pytest.mark.parametrize("bad", [".inf", "-.inf", ".nan", "nan", "inf", "1e400"])
def test_every_float_key_refuses_non_finite_values_naming_the_key(bad):
    for key in _float_keys():
        with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')} must be a finite number"):
            load_config(None, [f"{key}={bad}"])


def test_non_finite_in_a_config_file_is_refused_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("grpo:\n  kl_beta: .nan\n")
    with pytest.raises(ConfigError, match="grpo.kl_beta must be a finite number"):
        load_config(path)
    assert load_config(None, ["grpo.kl_beta=0.5", "grpo.lr=1e-4"]).grpo.lr == 1e-4  # finite values still load


# ----------------------------------------------------------------------------------------------- CLI: one line
def _cli(capsys, *argv: str) -> tuple[int, str]:
    from v3kit.cli import main

    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_cli_run_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    code, err = _cli(capsys, "run", "--set", f"run_dir={f}", "--set", "progress=false")
    assert code == 2 and "is a file" in _one_line(err) and str(f) in err


def test_cli_os_errors_name_the_file_and_fix(tmp_path, capsys, monkeypatch):
    import errno

    import v3kit.pipeline

    target = tmp_path / "run" / "config.yaml"
    for no, fix in (
        (errno.ENOSPC, "free space, then `--resume`"),
        (errno.EACCES, "writable"),
        (errno.EROFS, "writable"),
    ):

        def boom(cfg, path, no=no):
            raise OSError(no, __import__("os").strerror(no), str(target))

        monkeypatch.setattr(v3kit.pipeline, "dump_config", boom)
        code, err = _cli(capsys, "run", "--set", f"run_dir={tmp_path / 'run'}", "--set", "progress=false")
        line = _one_line(err)
        assert code == 2 and str(target) in line and fix in line, line


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "42\n", "just a string\n"])
def test_cli_config_file_that_is_not_a_mapping(tmp_path, capsys, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    for extra in ([], ["--set", "grpo.kl_beta=0.1"]):
        code, err = _cli(capsys, "run", "--config", str(path), *extra)
        assert code == 2 and str(path) in _one_line(err) and "mapping" in err


def _fake_checkpoint(tmp_path, **changes):
    from v3kit.train.checkpoint import save_checkpoint
    from v3kit.train.model import ModelConfig, build_model

    cfg = ModelConfig()
    payload = {
        "stage": "sft",
        "epoch": 1,
        "step": -1,
        "model_config": dict(vars(cfg)),
        "query_dim": 4,
        "cand_dim": 4,
        "model": build_model(cfg, 4, 4).state_dict(),
    }
    payload.update(changes)
    payload = {k: v for k, v in payload.items() if v is not None}
    return save_checkpoint(tmp_path / "bad.pt", payload)


def test_cli_checkpoint_without_model_key(tmp_path, capsys):
    path = _fake_checkpoint(tmp_path, model=None)
    code, err = _cli(capsys, "eval", str(path))
    assert code == 2 and str(path) in _one_line(err) and "'model'" in err


def test_cli_checkpoint_with_unknown_model_config_field(tmp_path, capsys):
    from v3kit.train.model import ModelConfig

    path = _fake_checkpoint(tmp_path, model_config={**vars(ModelConfig()), "n_heads_future": 3})
    for argv in (
        ["eval", str(path)],
        [
            "run",
            "--sft",
            str(path),
            "--set",
            f"run_dir={tmp_path / 'r'}",
            "--set",
            "progress=false",
            "--set",
            "data.synthetic.n_queries=60",
        ],
    ):
        code, err = _cli(capsys, *argv)
        assert code == 2 and str(path) in _one_line(err) and "n_heads_future" in err


# ----------------------------------------------------------------------------------------------- data contract
def _long_frame():
    import pandas as pd

    rows = []
    for q in ("q0", "q1"):
        for c in range(3):
            rows.append(
                {
                    "query_id": q,
                    "candidate_id": f"{q}c{c}",
                    "query_features": [1.0, 0.5],
                    "candidate_features": [0.1 * c, 1.0],
                    "reward": float(c),
                    "is_label": c == 0,
                }
            )
    return pd.DataFrame(rows)


def _refused(df, *needles: str) -> str:
    from v3kit.data import DataValidationError, from_long_frame

    with pytest.raises(DataValidationError) as info:
        from_long_frame(df)
    msg = str(info.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    return msg


@pytest.mark.parametrize("reward", [2.0, 7.0])  # the same or a conflicting reward: both are refused
def test_duplicate_query_candidate_pair_is_refused_naming_the_ids(reward):
    df = _long_frame()
    dup = df.iloc[[2]].assign(reward=reward, is_label=False)
    import pandas as pd

    _refused(pd.concat([df, dup], ignore_index=True), "'q0'", "'q0c2'", "[2, 6]", "duplicate")


@pytest.mark.parametrize("col", ["query_id", "candidate_id"])
def test_null_ids_are_refused_naming_the_row(col):
    df = _long_frame()
    df[col] = df[col].astype(object)
    df.loc[4, col] = None
    _refused(df, "row 4", f"{col} is null")


@pytest.mark.parametrize("col", ["query_features", "candidate_features"])
@pytest.mark.parametrize("value", [1e30, -2e6, float("nan"), float("inf")])
def test_absurd_or_non_finite_features_are_refused_naming_row_and_field(col, value):
    df = _long_frame()
    df.at[3, col] = [value, 1.0]
    if col == "query_features":  # a query's rows share one vector
        for i in (4, 5):
            df.at[i, col] = [value, 1.0]
    _refused(df, "row 3", col)


def test_features_at_the_limit_still_load():
    from v3kit.data import MAX_FEATURE_ABS, from_long_frame

    df = _long_frame()
    df.at[1, "candidate_features"] = [MAX_FEATURE_ABS, -MAX_FEATURE_ABS]
    assert float(from_long_frame(df).cand_x.abs().max()) == MAX_FEATURE_ABS


# ----------------------------------------------------------------------------------------------- metrics.csv
def _sft(run_dir, resume: bool = False):
    from conftest import tiny_config

    from v3kit.pipeline import prepare_data
    from v3kit.train.sft import train_sft

    cfg = tiny_config(run_dir)
    return train_sft(prepare_data(cfg), cfg.model, cfg.sft, seed=0, run_dir=run_dir, resume=resume, progress=False)


@pytest.fixture(scope="module")
def sft_reference(tmp_path_factory):
    """An uninterrupted tiny SFT run: its metrics.csv is what every repaired file must equal."""
    run = tmp_path_factory.mktemp("ref") / "run"
    _sft(run)
    return run


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_metrics_csv_is_laid_out_as_pandas_writes_it(sft_reference):
    import pandas as pd

    text = (sft_reference / "metrics.csv").read_text()
    frame = pd.read_csv(sft_reference / "metrics.csv")
    assert frame.to_csv(index=False) == text
    assert len(frame) == 1 + 3 * (3 + 1)  # epoch-0 eval + 3 epochs of (3 steps of 64 of 168 queries + 1 eval)


def _damaged_resumes_to_reference(sft_reference, tmp_path, damage) -> None:
    run = _copy(sft_reference, tmp_path / "run")
    damage(run / "metrics.csv")
    result = _sft(run, resume=True)
    assert (run / "metrics.csv").read_text() == (sft_reference / "metrics.csv").read_text()
    assert len(result.history) == len(__import__("pandas").read_csv(sft_reference / "metrics.csv"))


def test_rows_lost_after_the_epoch_checkpoint_are_restored_on_resume(sft_reference, tmp_path):
    # The kill window of a rewrite-after-checkpoint log: sft_epoch3.pt is in place, the file still ends at epoch 2.
    def drop_last_epoch(path):
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if not line.startswith(("sft,train,3,", "sft,val,3,"))]
        assert len(kept) == len(lines) - 4
        path.write_text("".join(kept))

    _damaged_resumes_to_reference(sft_reference, tmp_path, drop_last_epoch)


def test_empty_metrics_csv_is_repaired_on_resume(sft_reference, tmp_path):
    _damaged_resumes_to_reference(sft_reference, tmp_path, lambda p: p.write_text(""))


@pytest.mark.parametrize("cut", [1, 17, 200])
def test_torn_tail_is_repaired_on_resume(sft_reference, tmp_path, cut):
    _damaged_resumes_to_reference(sft_reference, tmp_path, lambda p: p.write_bytes(p.read_bytes()[:-cut]))


def test_fresh_run_over_an_empty_metrics_csv(sft_reference, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("")
    _sft(run)
    assert (run / "metrics.csv").read_text() == (sft_reference / "metrics.csv").read_text()


# ----------------------------------------------------------------------------------------------- NaN guard
def _tiny_splits(scale: float = 1.0):
    import dataclasses

    from conftest import tiny_config

    from v3kit.pipeline import prepare_data

    sp = prepare_data(tiny_config("unused"))
    big = (lambda d: dataclasses.replace(d, cand_x=d.cand_x * scale)) if scale != 1.0 else (lambda d: d)
    return type(sp)(train=big(sp.train), val=big(sp.val), test=big(sp.test))


def test_huge_features_stop_the_stage_with_one_line_and_no_checkpoint(tmp_path, capsys, monkeypatch):
    import v3kit.run

    splits = _tiny_splits(1e30)  # finite data, but the gradient overflows at the first step
    monkeypatch.setattr(v3kit.run, "prepare_data", lambda cfg, expect_dims=None: splits)
    run = tmp_path / "run"
    code, err = _cli(capsys, "run", "--set", f"run_dir={run}", "--set", "progress=false", "--set", "sft.epochs=2")
    line = _one_line(err)
    assert code == 2, line
    assert "sft: non-finite gradient at epoch 1, step 1" in line and "last good checkpoint: none" in line
    assert "sft.on_nonfinite=skip_batch" in line
    assert not list(run.glob("*.pt"))  # nothing poisoned was saved


def _fit_with(tmp_path, step_fn_factory, on_nonfinite="stop"):
    import torch

    from v3kit.train.model import ModelConfig, build_model
    from v3kit.train.sft import SFTConfig
    from v3kit.train.training import RunContext, Stage, fit

    splits = _tiny_splits()
    torch.manual_seed(0)
    model = build_model(ModelConfig(), splits.train.query_dim, splits.train.cand_dim)

    class FnStage(Stage):
        name = "sft"
        step = staticmethod(step_fn_factory(model))

    cfg = SFTConfig(epochs=3, lr=1e-3, batch_size=64, on_nonfinite=on_nonfinite)
    stage = FnStage(model, splits.train, splits.val, cfg, temperature=1.0)
    return model, fit(stage, RunContext(seed=0, run_dir=tmp_path / "run", progress=False))


def _nan_at(bad_steps, what="loss"):
    import torch

    from v3kit.train.model import policy_log_probs

    def factory(model):
        def step_fn(batch, ctx):
            logp = policy_log_probs(model, batch.query_x, batch.cand_x, batch.mask, 1.0)
            loss = -logp.gather(1, batch.labels.unsqueeze(1)).mean()
            if ctx.step + 1 in bad_steps:
                if what == "loss":
                    loss = loss * float("nan")
                else:  # poison a weight, outside autograd, after the loss was computed
                    with torch.no_grad():
                        next(model.parameters()).view(-1)[0] = float("inf")
                    loss = loss.detach()
            return loss, {}

        return step_fn

    return factory


def test_nan_loss_mid_stage_names_epoch_step_and_last_checkpoint(tmp_path):
    from v3kit.train.training import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"sft: non-finite loss at epoch 2, step 5; .*sft_epoch1\.pt"):
        _fit_with(tmp_path, _nan_at({5}))
    assert sorted(p.name for p in (tmp_path / "run").glob("*.pt")) == ["sft_epoch1.pt"]


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    from v3kit.train.training import NonFiniteError

    for mode in ("stop", "skip_batch"):
        with pytest.raises(NonFiniteError, match="non-finite weights at epoch 1, step 3"):
            _fit_with(tmp_path / mode, _nan_at({3}, what="weights"), on_nonfinite=mode)
        assert not list((tmp_path / mode / "run").glob("*.pt"))


def test_skip_batch_leaves_the_batch_out_and_counts_it(tmp_path):
    import torch

    model, result = _fit_with(tmp_path, _nan_at({2, 7}), on_nonfinite="skip_batch")
    train = result.train_history
    assert train["skipped_nonfinite"].tolist() == [int(s in (2, 7)) for s in range(1, 10)]
    assert result.info["skipped_batches"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert result.eval_history["mrr"].notna().all()


def test_skip_batch_is_a_config_key_and_reaches_the_printout(tmp_path, capsys, monkeypatch):
    import v3kit.run

    assert load_config(None, ["grpo.on_nonfinite=skip_batch"]).grpo.on_nonfinite == "skip_batch"
    with pytest.raises(ConfigError, match="rce.on_nonfinite must be one of"):
        load_config(None, ["rce.on_nonfinite=ignore"])
    splits = _tiny_splits(1e30)
    monkeypatch.setattr(v3kit.run, "prepare_data", lambda cfg, expect_dims=None: splits)
    code = __import__("v3kit.cli", fromlist=["main"]).main(
        [
            "run",
            "--set",
            f"run_dir={tmp_path / 'run'}",
            "--set",
            "progress=false",
            "--set",
            "sft.epochs=1",
            "--set",
            "rce.epochs=1",
            "--set",
            "grpo.epochs=1",
            "--set",
            "sft.on_nonfinite=skip_batch",
            "--set",
            "rce.on_nonfinite=skip_batch",
            "--set",
            "grpo.on_nonfinite=skip_batch",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "batches skipped for a non-finite loss/gradient (on_nonfinite=skip_batch): sft 3, rce 6, grpo 6" in out


# ----------------------------------------------------------------------------------------------- one run, one SFT
@pytest.mark.slow
def test_resume_with_another_sft_checkpoint_is_refused(tmp_path, capsys):
    import torch

    from v3kit.train.checkpoint import load_checkpoint, save_checkpoint

    common = [
        "--set",
        "progress=false",
        "--set",
        "data.synthetic.n_queries=240",
        "--set",
        "sft.epochs=1",
        "--set",
        "rce.epochs=1",
        "--set",
        "grpo.epochs=1",
    ]
    own = tmp_path / "own"
    assert _cli(capsys, "run", "--set", f"run_dir={own}", *common)[0] == 0
    sft_a = own / "sft.pt"
    ckpt = load_checkpoint(sft_a)
    ckpt["model"] = {k: v + 0.01 for k, v in ckpt["model"].items()}
    payload = {k: v for k, v in ckpt.items() if k not in ("format", "version")}
    sft_b = save_checkpoint(tmp_path / "other_sft.pt", payload)
    assert not torch.equal(
        load_checkpoint(sft_b)["model"][next(iter(ckpt["model"]))],
        load_checkpoint(sft_a)["model"][next(iter(ckpt["model"]))],
    )

    # a run that trained its own SFT model: resuming it from another --sft is refused
    code, err = _cli(capsys, "run", "--set", f"run_dir={own}", "--resume", "--sft", str(sft_b), *common)
    assert code == 2 and "sha256" in _one_line(err) and str(sft_b) in err
    assert _cli(capsys, "run", "--set", f"run_dir={own}", "--resume", *common)[0] == 0

    # a run started from --sft A: resuming with B, or without --sft (which would train a new SFT), is refused
    ext = tmp_path / "ext"
    assert _cli(capsys, "run", "--set", f"run_dir={ext}", "--sft", str(sft_a), *common)[0] == 0
    code, err = _cli(capsys, "run", "--set", f"run_dir={ext}", "--resume", "--sft", str(sft_b), *common)
    assert code == 2 and "sha256" in _one_line(err)
    code, err = _cli(capsys, "run", "--set", f"run_dir={ext}", "--resume", *common)
    assert code == 2 and "--sft" in _one_line(err) and str(sft_a.resolve()) in err
    assert _cli(capsys, "run", "--set", f"run_dir={ext}", "--resume", "--sft", str(sft_a), *common)[0] == 0


def test_a_held_run_dir_lock_refuses_a_second_writer_naming_the_pid(tmp_path, capsys):
    import fcntl
    import os

    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "w") as f:  # what another live `v3kit run` holds
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("4242\n")
        f.flush()
        code, err = _cli(capsys, "run", "--set", f"run_dir={run}", "--set", "progress=false")
    assert code == 2 and "PID 4242" in _one_line(err) and str(run) in err
    assert not (run / "config.yaml").exists()  # refused before writing anything
    assert os.path.getsize(run / ".lock") == 5
