"""End to end: determinism, resume, the RCE schedule, checkpoints, custom models and the CLI."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import tiny_config

from v3kit.cli import main
from v3kit.config import ConfigError
from v3kit.pipeline import prepare_data, run_pipeline
from v3kit.train.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from v3kit.train.model import ModelConfig, build_model
from v3kit.train.rce import RCEConfig, annealed_temperature, run_rce
from v3kit.train.sft import load_sft, train_sft


def test_same_config_and_seed_give_bit_identical_numbers(tmp_path):
    a = run_pipeline(tiny_config(tmp_path / "a"))
    b = run_pipeline(tiny_config(tmp_path / "b"))
    pd.testing.assert_frame_equal(a.table, b.table, check_exact=True)
    ma, mb = pd.read_csv(tmp_path / "a" / "metrics.csv"), pd.read_csv(tmp_path / "b" / "metrics.csv")
    pd.testing.assert_frame_equal(ma, mb, check_exact=True)
    assert list(a.table.index) == ["sft", "rce", "grpo", "selected"]
    # ... and the seed matters: another seed gives other numbers.
    c = run_pipeline(tiny_config(tmp_path / "c", "seed=1"))
    assert not a.table.equals(c.table)


def test_every_curve_starts_at_the_sft_baseline(tmp_path):
    r = run_pipeline(tiny_config(tmp_path / "r"))
    sft_last = r.rce.eval_history.iloc[0]  # RCE epoch 0 = the SFT model on val
    grpo_first = r.grpo.eval_history.iloc[0]
    assert r.rce.eval_history["epoch"].tolist() == [0, 1, 2]
    assert r.grpo.eval_history["epoch"].tolist() == [0, 1, 2, 3]
    assert sft_last["kl_to_sft"] == pytest.approx(0.0, abs=1e-7)
    # GRPO starts where RCE ended.
    assert grpo_first["acc@1"] == r.rce.eval_history.iloc[-1]["acc@1"]
    needed = {
        "loss",
        "pg_loss",
        "kl",
        "ratio_mean",
        "ratio_min",
        "ratio_max",
        "clip_ratio",
        "entropy",
        "adv_std",
        "frac_reward_zero_std",
        "grad_norm",
        "lr",
        "temperature",
    }
    assert needed <= set(r.grpo.train_history.columns)
    assert r.grpo.train_history[sorted(needed)].notna().all().all()
    for name in ("rce_epoch1.pt", "rce_epoch2.pt", "grpo_epoch3.pt", "sft.pt", "metrics.csv", "summary.csv"):
        assert (tmp_path / "r" / name).exists(), name


def test_rce_temperature_anneals_linearly_per_step(tmp_path):
    assert annealed_temperature(0, 11, 2.0, 0.5) == 2.0
    assert annealed_temperature(10, 11, 2.0, 0.5) == 0.5
    assert annealed_temperature(5, 11, 2.0, 0.5) == pytest.approx(1.25)
    assert annealed_temperature(0, 1, 2.0, 0.5) == 0.5
    r = run_pipeline(tiny_config(tmp_path / "r"))
    temps = r.rce.train_history["temperature"].to_numpy()
    assert temps[0] == 2.0 and temps[-1] == pytest.approx(0.5)
    steps = len(temps)
    expected = [2.0 + (0.5 - 2.0) * i / (steps - 1) for i in range(steps)]
    assert temps.tolist() == pytest.approx(expected)


class Crash(Exception):
    pass


class CrashAfter:
    """Callback that kills the run right after GRPO's evaluation of ``epoch`` (the checkpoint is already saved)."""

    def __init__(self, stage: str, epoch: int) -> None:
        self.stage, self.epoch = stage, epoch

    def on_stage_end(self, stage, result):
        pass

    def on_step(self, row):
        if row["stage"] == self.stage and row["epoch"] == self.epoch + 1:
            raise Crash


@pytest.mark.parametrize("switches", [[], ["grpo.old_policy=refresh_each_epoch", "grpo.samples=sampled"]])
def test_resume_after_grpo_epoch_2_matches_uninterrupted(tmp_path, switches):
    full = run_pipeline(tiny_config(tmp_path / "full", "grpo.epochs=4", *switches))
    cfg = tiny_config(tmp_path / "cut", "grpo.epochs=4", *switches)
    with pytest.raises(Crash):
        run_pipeline(cfg, callbacks=[CrashAfter("grpo", 2)])
    assert not (tmp_path / "cut" / "grpo_epoch3.pt").exists()
    resumed = run_pipeline(cfg, resume=True)
    assert resumed.grpo.info["resumed_from_epoch"] == 2
    a = load_checkpoint(tmp_path / "full" / "grpo_epoch4.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "grpo_epoch4.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    pd.testing.assert_frame_equal(full.table, resumed.table, check_exact=True)
    m = pd.read_csv(tmp_path / "cut" / "metrics.csv")
    grpo_val = m[(m.stage == "grpo") & (m.split == "val")]
    assert grpo_val["epoch"].tolist() == [0, 1, 2, 3, 4]  # no duplicated rows after the resume


def test_checkpoint_round_trip_and_contents(tmp_path):
    cfg = tiny_config(tmp_path / "r")
    splits = prepare_data(cfg)
    res = train_sft(splits, cfg.model, cfg.sft, run_dir=cfg.run_dir, progress=False)
    ckpt = load_checkpoint(tmp_path / "r" / "sft_epoch3.pt", stage="sft")
    assert {"model", "optimizer", "config", "epoch", "step", "rng", "model_config"} <= set(ckpt)
    assert ckpt["epoch"] == 3 and ckpt["config"]["epochs"] == 3
    model = model_from_checkpoint(ckpt)
    x = splits.val
    with torch.no_grad():
        torch.testing.assert_close(model.encode_candidates(x.cand_x), res.model.encode_candidates(x.cand_x))
    stage1 = load_sft(tmp_path / "r" / "sft.pt", splits.train)
    assert stage1.old_log_probs.shape == splits.train.mask.shape
    assert torch.isneginf(stage1.old_log_probs[~splits.train.mask]).all()
    assert not any(p.requires_grad for p in stage1.reference.parameters())
    with pytest.raises(CheckpointError, match="is a 'sft' checkpoint, expected a 'grpo' one"):
        load_checkpoint(tmp_path / "r" / "sft.pt", stage="grpo")


def test_bad_checkpoints_give_clear_errors(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt or not a v3kit checkpoint"):
        load_checkpoint(corrupt)
    good = tmp_path / "good.pt"
    model = build_model(ModelConfig(), 16, 16)
    save_checkpoint(
        good,
        {
            "stage": "sft",
            "epoch": 1,
            "step": 1,
            "model": model.state_dict(),
            "model_config": vars(ModelConfig()),
            "query_dim": 16,
            "cand_dim": 16,
        },
    )
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a v3kit checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    # A checkpoint whose weights do not fit the model config it claims.
    wide = build_model(ModelConfig(hidden=[8]), 16, 16)
    mismatch = tmp_path / "mismatch.pt"
    save_checkpoint(
        mismatch,
        {
            "stage": "sft",
            "epoch": 1,
            "step": 1,
            "model": wide.state_dict(),
            "model_config": vars(ModelConfig()),
            "query_dim": 16,
            "cand_dim": 16,
        },
    )
    with pytest.raises(CheckpointError, match=r"does not fit this model \(shape mismatch"):
        model_from_checkpoint(load_checkpoint(mismatch), mismatch)


def test_checkpoint_on_other_feature_dims_is_rejected(tmp_path):
    cfg = tiny_config(tmp_path / "r")
    train_sft(prepare_data(cfg), cfg.model, cfg.sft, run_dir=cfg.run_dir, progress=False)
    other = prepare_data(tiny_config(tmp_path / "o", "data.synthetic.feature_dim=12"))
    with pytest.raises(
        CheckpointError, match=r"features of dim \(query 16, candidate 16\) but the data has \(12, 12\)"
    ):
        load_sft(tmp_path / "r" / "sft.pt", other.train)


def test_failed_save_leaves_no_file(tmp_path):
    target = tmp_path / "x.pt"
    with pytest.raises(Exception):  # noqa: B017 - whatever torch's pickler raises for a lambda; the point is the file
        save_checkpoint(target, {"model": lambda: None})  # not serialisable
    assert list(tmp_path.iterdir()) == []


def test_custom_model_by_import_string(tmp_path):
    r = run_pipeline(
        tiny_config(tmp_path / "r", "model.target=custom_models:BilinearRanker", "model.kwargs={emb_dim: 4}")
    )
    assert type(r.stage1.policy).__name__ == "BilinearRanker" and r.stage1.policy.q.out_features == 4
    with pytest.raises(TypeError, match=r"not an nn.Module with tower methods \(encode_query"):
        build_model(ModelConfig(target="custom_models:NotARanker"), 4, 4)
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.models'"):
        build_model(ModelConfig(target="no_such_pkg.models:X"), 4, 4)
    with pytest.raises(ValueError, match="has no attribute 'Missing'"):
        build_model(ModelConfig(target="custom_models:Missing"), 4, 4)


def test_cli_run_and_eval(tmp_path, capsys):
    run_dir = tmp_path / "cli"
    args = ["run", "--set", f"run_dir={run_dir}"]
    for o in ("progress=false", "data.synthetic.n_queries=240", "sft.epochs=2", "rce.epochs=1", "grpo.epochs=1"):
        args += ["--set", o]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "held-out test metrics by stage" in out and "GRPO step-0 ratio" in out
    assert f"v3kit doctor {run_dir}" in out
    lines = [ln.split()[0] for ln in out.splitlines() if ln.split()]
    assert {"sft", "rce", "grpo"} <= set(lines)
    assert main(["eval", str(run_dir / "grpo_epoch1.pt")]) == 0
    out = capsys.readouterr().out
    assert "grpo epoch 1" in out and "acc@1" in out and "kl_to_sft" in out
    assert main(["run", "--set", "grpo.kl_bta=1"]) == 2
    assert "did you mean 'grpo.kl_beta'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nope.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_resume_refuses_another_config_and_fresh_runs_drop_stale_checkpoints(tmp_path):
    run_pipeline(tiny_config(tmp_path / "r", "grpo.epochs=3"))
    with pytest.raises(ConfigError, match=r"cannot resume .*grpo.kl_beta: 0.1 -> 0.5"):
        run_pipeline(tiny_config(tmp_path / "r", "grpo.epochs=3", "grpo.kl_beta=0.5"), resume=True)
    for change in ("data.synthetic.reward_bias=2.0", "model.emb_dim=8", "seed=5", "rce.epochs=3", "sft.lr=0.01"):
        with pytest.raises(ConfigError, match=r"cannot resume .*" + change.split("=")[0].replace(".", r"\.")):
            run_pipeline(tiny_config(tmp_path / "r", "grpo.epochs=3", change), resume=True)
    # The last stage may be extended: GRPO 3 -> 4 epochs resumes from grpo_epoch3.pt.
    more = run_pipeline(tiny_config(tmp_path / "r", "grpo.epochs=4"), resume=True)
    assert more.grpo.info["resumed_from_epoch"] == 3 and (tmp_path / "r" / "grpo_epoch4.pt").exists()
    # Without resume the run starts over, and the old run's extra epochs cannot leak into a later resume.
    run_pipeline(tiny_config(tmp_path / "r", "grpo.epochs=1", "grpo.kl_beta=0.5"))
    assert sorted(p.name for p in (tmp_path / "r").glob("grpo_epoch*.pt")) == ["grpo_epoch1.pt"]


def test_pipeline_runs_on_a_users_parquet_file(tmp_path):
    from v3kit.data import to_long_frame
    from v3kit.data.synthetic import SyntheticConfig, make_world

    frame = to_long_frame(make_world(SyntheticConfig(n_queries=200, seed=5))).drop(columns=["utility"])
    frame.to_parquet(tmp_path / "mine.parquet")
    r = run_pipeline(tiny_config(tmp_path / "r", f"data.path={tmp_path / 'mine.parquet'}", "grpo.epochs=1"))
    assert list(r.table.index) == ["sft", "rce", "grpo", "selected"]
    assert "utility@1" not in r.table.columns  # no hidden truth in real data
    assert len(r.splits.train) + len(r.splits.val) + len(r.splits.test) == 200


def test_rce_resume_refuses_a_longer_schedule(tmp_path):
    cfg = tiny_config(tmp_path / "r")
    splits = prepare_data(cfg)
    train_sft(splits, cfg.model, cfg.sft, run_dir=cfg.run_dir, progress=False)
    stage1 = load_sft(tmp_path / "r" / "sft.pt", splits.train)
    run_rce(stage1.policy, splits, RCEConfig(epochs=1), run_dir=cfg.run_dir, progress=False)
    with pytest.raises(CheckpointError, match=r"cannot resume .*epochs: 1 -> 2"):
        run_rce(stage1.policy, splits, RCEConfig(epochs=2), run_dir=cfg.run_dir, resume=True, progress=False)


def test_interrupted_sft_resumes(tmp_path):
    full = run_pipeline(tiny_config(tmp_path / "full", "grpo.epochs=1"))
    cfg = tiny_config(tmp_path / "cut", "grpo.epochs=1")
    with pytest.raises(Crash):
        run_pipeline(cfg, callbacks=[CrashAfter("sft", 2)])
    assert not (tmp_path / "cut" / "sft.pt").exists() and (tmp_path / "cut" / "sft_epoch2.pt").exists()
    starts = {}

    class Record:
        def on_stage_start(self, stage, total_steps, info):
            starts[stage] = info["resumed_from_epoch"]

    resumed = run_pipeline(cfg, resume=True, callbacks=[Record()])
    assert starts["sft"] == 2  # continued from sft_epoch2.pt, not retrained
    sft_rows = pd.read_csv(tmp_path / "cut" / "metrics.csv").query("stage == 'sft' and split == 'val'")
    assert sft_rows["epoch"].tolist() == [0, 1, 2, 3]
    pd.testing.assert_frame_equal(full.table, resumed.table, check_exact=True)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("rce.epochs=-1", "rce.epochs must be >= 0"),
        ("grpo.lr=0", "grpo.lr must be > 0"),
        ("grpo.batch_size=0", "grpo.batch_size must be >= 1"),
        ("data.val_frac=0", "data.val_frac"),
        ("grpo.eps_low=1.5", "grpo.eps_low must be in"),
        ("grpo.adv_eps=-1", "grpo.adv_eps must be >= 0"),
        ("model.emb_dim=0", "model.emb_dim"),
        ("data.synthetic.random_frac=2", "random_frac must be in"),
        ("model.kwargs={a: 1}", "could not be built with query_dim, cand_dim and model.kwargs"),
    ],
)
def test_cli_rejects_bad_values_before_training(tmp_path, capsys, override, needle):
    assert main(["run", "--set", f"run_dir={tmp_path / 'r'}", "--set", "progress=false", "--set", override]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "r" / "sft.pt").exists()  # failed fast: nothing trained


def test_cli_eval_on_mismatched_or_foreign_checkpoints(tmp_path, capsys):
    run_dir = tmp_path / "r"
    cfg = tiny_config(run_dir)
    train_sft(prepare_data(cfg), cfg.model, cfg.sft, run_dir=run_dir, progress=False)
    assert (
        main(
            [
                "eval",
                str(run_dir / "sft.pt"),
                "--set",
                "data.synthetic.feature_dim=8",
                "--set",
                "data.synthetic.n_queries=240",
            ]
        )
        == 2
    )
    assert "trained on features of dim (query 16, candidate 16)" in capsys.readouterr().err
    (tmp_path / "notes.pt").write_text("hello")
    assert main(["eval", str(tmp_path / "notes.pt")]) == 2
    assert "corrupt or not a v3kit checkpoint" in capsys.readouterr().err
