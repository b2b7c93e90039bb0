"""The GRPO doctor: each check on a metrics frame crafted to trigger it and on a healthy one that must not, the
report formats, the CLI, and one real (tiny) run end to end."""

from __future__ import annotations

from typing import Any, Callable

import pandas as pd
import pytest

from v3kit.cli import main
from v3kit.diagnose import Finding, Thresholds, diagnose, format_report, report_frame

CHECKS = ["step0_ratio", "clip_ratio", "zero_std_groups", "kl_growth", "kl_pinned", "entropy_collapse",
          "reward_vs_label", "rce_converged"]

SEED_CFG: dict[str, Any] = {
    "model": {"sim_temperature": 1.0},
    "rce": {"epochs": 3},
    "grpo": {"eps_low": 0.2, "eps_high": None, "old_policy": "sft", "kl_reference": "old", "kl_beta": 0.1,
             "drop_zero_std_groups": False},
}


def val_row(stage: str, epoch: int, **m: float) -> dict[str, Any]:
    base = {"acc@1": 0.36, "mrr": 0.58, "ndcg@5": 0.9, "reward@1": 2.40, "regret@1": 0.4, "utility@1": 2.40,
            "kl_to_sft": 0.0, "entropy": 1.40}
    return {"stage": stage, "split": "val", "epoch": epoch, "step": 0, **base, **m}


def frame(
    *,
    rce_loss: list[float] = (1.50, 1.45, 1.44),  # epoch means; the last epoch falls 0.7%: converged
    rce_temperature: list[float] | None = None,
    grpo_epochs: int = 4,
    steps_per_epoch: int = 10,
    step0: dict[str, float] | None = None,
    clip: Callable[[float], float] = lambda t: 0.05,  # t = progress through GRPO in [0, 1]
    zero_std: Callable[[float], float] = lambda t: 0.0,
    kl: Callable[[float], float] = lambda t: 0.01,
    ratio: tuple[float, float, float] = (1.0, 0.9, 1.1),  # first-batch mean, min, max
    temperature: float = 1.0,
    kl_to_sft: list[float] | None = None,  # GRPO val epochs 0..N
    entropy: list[float] | None = None,
    reward: list[float] | None = None,
    acc: list[float] | None = None,
    sft_val: dict[str, float] | None = None,  # RCE epoch-0 row (= the SFT baseline)
) -> pd.DataFrame:
    """A metrics.csv-shaped frame of a healthy run unless a knob says otherwise."""
    n = grpo_epochs
    kl_to_sft = kl_to_sft or [0.002, 0.015, 0.02, 0.021, 0.021]  # rises, then plateaus
    entropy = entropy or [1.40, 1.39, 1.38, 1.37, 1.37]
    reward = reward or [2.40, 2.42, 2.43, 2.44, 2.44]
    acc = acc or [0.36, 0.362, 0.364, 0.365, 0.365]
    rows: list[dict[str, Any]] = [val_row("sft", 0)]
    rows.append(val_row("rce", 0, **(sft_val or {})))
    step = 0
    for e, loss in enumerate(rce_loss, start=1):
        for _ in range(steps_per_epoch):
            step += 1
            t = rce_temperature[e - 1] if rce_temperature else 1.0
            rows.append({"stage": "rce", "split": "train", "epoch": e, "step": step, "loss": loss,
                         "temperature": t, "grad_norm": 1.0, "lr": 1e-5})
        rows.append(val_row("rce", e, step=step, kl_to_sft=0.002))
    s0 = {"step0_ratio_mean": 1.0, "step0_ratio_std": 0.01, "step0_ratio_min": 0.97, "step0_ratio_max": 1.03,
          "step0_outside_clip": 0.0, **(step0 or {})}
    rows.append(val_row("grpo", 0, kl_to_sft=kl_to_sft[0], entropy=entropy[0], **{"reward@1": reward[0]},
                        **{"acc@1": acc[0]}, **s0))
    total, step = n * steps_per_epoch, 0
    for e in range(1, n + 1):
        for _ in range(steps_per_epoch):
            t = step / max(total - 1, 1)
            first = step == 0
            step += 1
            rows.append({"stage": "grpo", "split": "train", "epoch": e, "step": step, "loss": 0.0, "pg_loss": 0.0,
                         "kl": kl(t), "ratio_mean": ratio[0] if first else 1.0,
                         "ratio_min": ratio[1] if first else 0.9, "ratio_max": ratio[2] if first else 1.1,
                         "clip_ratio": clip(t), "entropy": entropy[min(e, n)], "adv_std": 0.9,
                         "frac_reward_zero_std": zero_std(t), "grad_norm": 1.0, "lr": 1e-5,
                         "temperature": temperature})
        rows.append(val_row("grpo", e, step=step, kl_to_sft=kl_to_sft[e], entropy=entropy[e],
                            **{"reward@1": reward[e], "acc@1": acc[e]}))
    return pd.DataFrame(rows)


def by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in findings}


def run(df: pd.DataFrame, config: dict[str, Any] | None = SEED_CFG, **th: float) -> dict[str, Finding]:
    return by_check(diagnose(df, config, Thresholds(**th) if th else None))


def test_healthy_run_triggers_nothing_and_every_check_reports_its_number():
    found = diagnose(frame(), SEED_CFG)
    assert [f.check for f in found] == CHECKS
    assert [f.check for f in found if f.triggered] == []
    assert all(f.value is not None and f.threshold is not None for f in found)
    assert all(f.message and not f.message.startswith("skipped") for f in found)


# ---------------------------------------------------------------- 1. step-0 ratio

def test_step0_ratio_far_from_one_is_flagged_as_stale_old_policy():
    f = run(frame(step0={"step0_ratio_mean": 1.3, "step0_ratio_std": 0.6, "step0_outside_clip": 0.4}))["step0_ratio"]
    assert f.triggered and f.value == pytest.approx(0.4) and f.threshold == 0.05
    assert "stale old policy" in f.message and "grpo.old_policy=refresh_at_start" in f.suggestion
    assert "40.0%" in f.message
    # a mean shift alone (spread inside the clip range) is still a mismatch
    g = run(frame(step0={"step0_ratio_mean": 1.1, "step0_outside_clip": 0.0}))["step0_ratio"]
    assert g.triggered and g.value == 0.0
    assert not run(frame(step0={"step0_outside_clip": 0.04}))["step0_ratio"].triggered


def test_step0_ratio_blames_a_temperature_mismatch_when_grpo_logits_use_another_temperature():
    cfg = {**SEED_CFG, "rce": {"epochs": 0}}  # no RCE: the only reason left is the temperature
    f = run(frame(temperature=0.5, step0={"step0_ratio_mean": 0.6, "step0_outside_clip": 0.8}), cfg)["step0_ratio"]
    assert f.triggered and "temperature 0.5" in f.message and "stale" not in f.message
    assert "grpo.logp_temperature=1" in f.suggestion


def test_step0_ratio_falls_back_on_the_first_grpo_batch():
    df = frame(ratio=(1.2, 0.5, 2.0)).drop(columns=[c for c in frame().columns if c.startswith("step0_")])
    f = run(df)["step0_ratio"]
    assert f.triggered and f.value == pytest.approx(1.0) and "first GRPO batch" in f.message
    healthy = frame(ratio=(1.0, 0.95, 1.05)).drop(columns=[c for c in frame().columns if c.startswith("step0_")])
    assert not run(healthy)["step0_ratio"].triggered
    # refresh_each_epoch refreshes before the first step, so the stage-1 step0_* summary is not what GRPO saw
    cfg = {**SEED_CFG, "grpo": {**SEED_CFG["grpo"], "old_policy": "refresh_each_epoch"}}
    g = run(frame(step0={"step0_outside_clip": 0.5}, ratio=(1.0, 1.0, 1.0)), cfg)["step0_ratio"]
    assert not g.triggered and g.value == 0.0


# ---------------------------------------------------------------- 2. clip ratio

def test_clip_ratio_high_at_the_end_suggests_refreshing_the_old_policy():
    f = run(frame(clip=lambda t: 0.05 if t < 0.5 else 0.4))["clip_ratio"]
    assert f.triggered and f.value == pytest.approx(0.4) and "high at the end" in f.message
    assert "grpo.old_policy=refresh_each_epoch" in f.suggestion
    early = run(frame(clip=lambda t: 0.5 if t < 0.3 else 0.05))["clip_ratio"]
    assert early.triggered and "from the start" in early.message and "refresh_at_start" in early.suggestion


def test_a_short_clip_spike_is_not_high_for_long():
    f = run(frame(clip=lambda t: 0.9 if 0.45 < t < 0.5 else 0.05))["clip_ratio"]
    assert not f.triggered and f.value == pytest.approx(0.05)


# ---------------------------------------------------------------- 3. zero-std groups

def test_many_zero_std_groups_are_flagged():
    f = run(frame(zero_std=lambda t: 0.5))["zero_std_groups"]
    assert f.triggered and f.value == pytest.approx(0.5)
    assert "grpo.drop_zero_std_groups=true" in f.suggestion and "reward weights" in f.suggestion
    cfg = {**SEED_CFG, "grpo": {**SEED_CFG["grpo"], "drop_zero_std_groups": True}}
    assert "drop_zero_std_groups" not in run(frame(zero_std=lambda t: 0.5), cfg)["zero_std_groups"].suggestion
    assert not run(frame(zero_std=lambda t: 0.1))["zero_std_groups"].triggered


# ---------------------------------------------------------------- 4. KL

def test_kl_to_sft_still_climbing_and_large_is_unbounded():
    f = run(frame(kl_to_sft=[0.0, 0.1, 0.2, 0.3, 0.4]))["kl_growth"]
    assert f.triggered and f.value == pytest.approx(0.4) and "without bound" in f.message
    assert "grpo.kl_reference=sft" in f.suggestion
    cfg = {**SEED_CFG, "grpo": {**SEED_CFG["grpo"], "old_policy": "refresh_each_epoch"}}
    g = run(frame(kl_to_sft=[0.0, 0.1, 0.2, 0.3, 0.4]), cfg)["kl_growth"]
    assert "refreshed old policy" in g.message and g.suggestion == "grpo.kl_reference=sft"


def test_large_but_plateaued_kl_or_small_growing_kl_is_not_unbounded():
    assert not run(frame(kl_to_sft=[0.0, 0.3, 0.3, 0.3, 0.3]))["kl_growth"].triggered
    assert not run(frame(kl_to_sft=[0.0, 0.01, 0.02, 0.03, 0.04]))["kl_growth"].triggered


def test_kl_growth_falls_back_on_the_penalty_kl():
    df = frame(kl=lambda t: 0.5 * t).drop(columns=["kl_to_sft"])
    f = run(df)["kl_growth"]
    assert f.triggered and "penalty KL" in f.message


def test_kl_pinned_at_zero_or_switched_off_is_flagged():
    # the policy moved (kl_to_sft grows) yet the penalty sees nothing: its reference follows the policy
    f = run(frame(kl=lambda t: 0.0))["kl_pinned"]
    assert f.triggered and f.value == 0.0 and f.suggestion == "grpo.kl_reference=sft"
    # the policy did not move at all: GRPO is not learning
    g = run(frame(kl=lambda t: 0.0, kl_to_sft=[0.0] * 5))["kl_pinned"]
    assert g.triggered and "grpo.lr" in g.suggestion
    cfg = {**SEED_CFG, "grpo": {**SEED_CFG["grpo"], "kl_beta": 0.0}}
    h = run(frame(), cfg)["kl_pinned"]
    assert h.triggered and "kl_beta=0" in h.message
    assert not run(frame(kl=lambda t: 0.01))["kl_pinned"].triggered


# ---------------------------------------------------------------- 5. entropy

def test_entropy_collapse_is_flagged_with_the_relative_drop():
    f = run(frame(entropy=[1.4, 1.1, 0.9, 0.8, 0.7]))["entropy_collapse"]
    assert f.triggered and f.value == pytest.approx(0.5) and "eps_high" in f.suggestion
    assert not run(frame(entropy=[1.4, 1.35, 1.3, 1.25, 1.2]))["entropy_collapse"].triggered  # 14% drop


# ---------------------------------------------------------------- 6. reward vs label

def test_reward_up_while_labels_fall_says_worse_depends_on_the_metric():
    f = run(frame(reward=[2.4, 2.5, 2.6, 2.7, 2.8], acc=[0.36, 0.35, 0.34, 0.33, 0.32]))["reward_vs_label"]
    assert f.triggered and f.value == pytest.approx(0.04 / 0.36)
    assert "'worse' depends on the metric" in f.message and "acc@1" in f.message
    assert "reward weights" in f.suggestion
    # both rising is healthy; labels falling while reward also falls is not this check's business
    assert not run(frame(reward=[2.4, 2.5, 2.6, 2.7, 2.8]))["reward_vs_label"].triggered
    assert not run(frame(reward=[2.4, 2.3, 2.3, 2.3, 2.3], acc=[0.36, 0.3, 0.3, 0.3, 0.3]))[
        "reward_vs_label"].triggered


def test_reward_vs_label_also_compares_against_the_sft_baseline():
    # GRPO itself is fine, but RCE already traded labels for reward: SFT -> end shows it
    df = frame(sft_val={"acc@1": 0.40, "reward@1": 2.30})
    f = run(df)["reward_vs_label"]
    assert f.triggered and "SFT -> GRPO end" in f.message and "GRPO start -> end" in f.message


# ---------------------------------------------------------------- 7. RCE convergence

def test_rce_loss_still_falling_at_its_last_epoch_is_flagged():
    f = run(frame(rce_loss=[2.0, 1.8, 1.5]))["rce_converged"]
    assert f.triggered and f.value == pytest.approx(0.3 / 1.8)
    assert f.suggestion.startswith("rce.epochs=6")
    # an annealed temperature between the epochs is named as a confound
    g = run(frame(rce_loss=[2.0, 1.8, 1.5], rce_temperature=[1.75, 1.25, 0.75]))["rce_converged"]
    assert g.triggered and "overstates" in g.message


def test_rce_in_a_run_dir_is_judged_at_a_fixed_temperature(tmp_path, monkeypatch):
    import yaml
    from v3kit import diagnose as doctor

    frame(rce_loss=[2.0, 1.8, 1.5]).to_csv(tmp_path / "metrics.csv", index=False)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**SEED_CFG, "rce": {"epochs": 3, "t_end": 0.5}}))
    # the logged loss falls 17%, but the policies re-scored at the final temperature have flattened out
    monkeypatch.setattr(doctor, "_rce_fixed_temperature_losses", lambda run_dir, cfg: {0: 1.5, 2: 1.401, 3: 1.4})
    f = by_check(diagnose(tmp_path))["rce_converged"]
    assert not f.triggered and f.value == pytest.approx(0.001 / 1.401) and "final temperature" in f.message
    # a small fall that keeps its pace (a tiny lr) is still not converged
    monkeypatch.setattr(doctor, "_rce_fixed_temperature_losses", lambda run_dir, cfg: {0: 1.5, 2: 1.47, 3: 1.455})
    g = by_check(diagnose(tmp_path))["rce_converged"]
    assert g.triggered and g.value == pytest.approx(0.015 / (0.045 / 3)) and g.threshold == 0.5
    assert "rce.epochs=6" in g.suggestion


def test_rce_converged_single_epoch_and_no_rce():
    one = run(frame(rce_loss=[1.5]))["rce_converged"]  # constant within the epoch
    assert not one.triggered and one.value == 0.0 and "only RCE epoch" in one.message
    df = frame()
    none = run(df[~((df["stage"] == "rce") & (df["split"] == "train"))], {**SEED_CFG, "rce": {"epochs": 0}})
    assert none["rce_converged"].value is None and "rce.epochs=0" in none["rce_converged"].message


# ---------------------------------------------------------------- robustness and formats

def test_missing_stages_or_columns_skip_with_a_reason_instead_of_crashing():
    for df in (pd.DataFrame(), frame()[lambda d: d["stage"] == "sft"], frame()[["stage", "split", "epoch"]]):
        found = diagnose(df)
        assert [f.check for f in found] == CHECKS
        assert all(not f.triggered and f.value is None and f.message.startswith("skipped") for f in found)


def test_thresholds_decide():
    df = frame(zero_std=lambda t: 0.15)
    assert not run(df)["zero_std_groups"].triggered
    assert run(df, zero_std_frac=0.1)["zero_std_groups"].triggered


def test_report_text_and_frame():
    found = diagnose(frame(zero_std=lambda t: 0.5), SEED_CFG)
    text = format_report(found)
    lines = text.splitlines()
    for check in CHECKS:
        assert any(check in ln for ln in lines)
    flagged = next(ln for ln in lines if "zero_std_groups" in ln)
    assert flagged.startswith("⚠") and "value 0.5" in flagged and "threshold 0.2" in flagged
    assert next(ln for ln in lines if "clip_ratio" in ln).startswith("✔")
    assert "-> try: grpo.drop_zero_std_groups=true" in text
    assert lines[-1].startswith("1 of 8 checks flagged: zero_std_groups")
    table = report_frame(found)
    assert list(table.columns) == ["check", "triggered", "value", "threshold", "message", "suggestion"]
    assert table.set_index("check").loc["zero_std_groups", "triggered"]
    assert table["triggered"].sum() == 1


# ---------------------------------------------------------------- a real run and the CLI

@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    from v3kit.config import load_config
    from v3kit.pipeline import run_pipeline

    d = tmp_path_factory.mktemp("doctor") / "run"
    cfg = load_config(None, ["progress=false", "data.synthetic.n_queries=300", "sft.epochs=3", "rce.epochs=1",
                             "grpo.epochs=2", f"run_dir={d}"])
    run_pipeline(cfg)
    return d


def test_real_run_end_to_end(real_run):
    found = by_check(diagnose(real_run))
    assert list(found) == CHECKS
    metrics = pd.read_csv(real_run / "metrics.csv")
    row0 = metrics[(metrics["stage"] == "grpo") & (metrics["split"] == "val") & (metrics["epoch"] == 0)].iloc[0]
    assert found["step0_ratio"].value == pytest.approx(row0["step0_outside_clip"])
    grpo = metrics[(metrics["stage"] == "grpo") & (metrics["split"] == "train")]
    assert found["zero_std_groups"].value == pytest.approx(grpo["frac_reward_zero_std"].mean())
    # RCE re-scored from its checkpoints at the final temperature: SFT (epoch 0) against the one RCE epoch
    assert "policy after epoch 0 -> after epoch 1" in found["rce_converged"].message
    # every check had what it needs in a real run: nothing skipped
    assert all(f.value is not None for f in found.values())


def test_cli_doctor_prints_the_report(real_run, capsys):
    assert main(["doctor", str(real_run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"GRPO health report: {real_run}")
    for check in CHECKS:
        assert check in out


def test_cli_doctor_missing_dir_or_metrics_gives_one_clear_line(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["doctor", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err and "does not exist" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["doctor", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(empty / "metrics.csv") in err


def test_cli_doctor_on_an_empty_or_foreign_metrics_file(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.csv").write_text("")
    assert main(["doctor", str(tmp_path / "empty")]) == 2
    assert "is empty" in capsys.readouterr().err
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "metrics.csv").write_text("a,b\n1,2\n")
    assert main(["doctor", str(tmp_path / "foreign")]) == 2
    err = capsys.readouterr().err
    assert "not a v3kit metrics.csv" in err and "'stage'" in err
