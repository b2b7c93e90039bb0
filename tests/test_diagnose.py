"""The GRPO doctor: each check on a metrics frame crafted to trigger it and on a healthy one that must not, the
report formats, the CLI, and one real (tiny) run end to end."""

from __future__ import annotations

from typing import Any, Callable

import pandas as pd
import pytest
import torch

from v3kit.cli import main
from v3kit.diagnose import Finding, Thresholds, diagnose, format_report, report_frame

FRAME_CHECKS = [
    "step0_ratio",
    "clip_ratio",
    "zero_std_groups",
    "kl_growth",
    "kl_pinned",
    "entropy_collapse",
    "reward_vs_label",
    "rce_converged",
]
DATA_CHECKS = ["reward_shortcut", "rce_targets", "baselines"]  # need the run's data: skipped on a bare frame
CHECKS = FRAME_CHECKS + DATA_CHECKS

SEED_CFG: dict[str, Any] = {
    "model": {"sim_temperature": 1.0},
    "rce": {"epochs": 3},
    "grpo": {
        "eps_low": 0.2,
        "eps_high": None,
        "old_policy": "sft",
        "kl_reference": "old",
        "kl_beta": 0.1,
        "drop_zero_std_groups": False,
    },
}


BEST_REWARD = 3.0  # mean best reward of the crafted val groups


def val_row(stage: str, epoch: int, **m: float) -> dict[str, Any]:
    base = {
        "acc@1": 0.36,
        "mrr": 0.58,
        "ndcg@5": 0.9,
        "reward@1": 2.40,
        "regret@1": 0.4,
        "utility@1": 2.40,
        "kl_to_sft": 0.0,
        "entropy": 1.40,
    }
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
            rows.append(
                {
                    "stage": "rce",
                    "split": "train",
                    "epoch": e,
                    "step": step,
                    "loss": loss,
                    "temperature": t,
                    "grad_norm": 1.0,
                    "lr": 1e-5,
                }
            )
        rows.append(val_row("rce", e, step=step, kl_to_sft=0.02))
    s0 = {
        "step0_ratio_mean": 1.0,
        "step0_ratio_std": 0.01,
        "step0_ratio_min": 0.97,
        "step0_ratio_max": 1.03,
        "step0_outside_clip": 0.0,
        **(step0 or {}),
    }
    rows.append(
        val_row(
            "grpo", 0, kl_to_sft=kl_to_sft[0], entropy=entropy[0], **{"reward@1": reward[0]}, **{"acc@1": acc[0]}, **s0
        )
    )
    total, step = n * steps_per_epoch, 0
    for e in range(1, n + 1):
        for _ in range(steps_per_epoch):
            t = step / max(total - 1, 1)
            first = step == 0
            step += 1
            rows.append(
                {
                    "stage": "grpo",
                    "split": "train",
                    "epoch": e,
                    "step": step,
                    "loss": 0.0,
                    "pg_loss": 0.0,
                    "kl": kl(t),
                    "ratio_mean": ratio[0] if first else 1.0,
                    "ratio_min": ratio[1] if first else 0.9,
                    "ratio_max": ratio[2] if first else 1.1,
                    "clip_ratio": clip(t),
                    "entropy": entropy[min(e, n)],
                    "adv_std": 0.9,
                    "frac_reward_zero_std": zero_std(t),
                    "grad_norm": 1.0,
                    "lr": 1e-5,
                    "temperature": temperature,
                }
            )
        rows.append(
            val_row(
                "grpo",
                e,
                step=step,
                kl_to_sft=kl_to_sft[e],
                entropy=entropy[e],
                **{"reward@1": reward[e], "acc@1": acc[e]},
            )
        )
    df = pd.DataFrame(rows)
    df["regret@1"] = BEST_REWARD - df["reward@1"]  # the groups' best reward is fixed: regret mirrors reward@1
    return df


def by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in findings}


def run(df: pd.DataFrame, config: dict[str, Any] | None = SEED_CFG, **th: float) -> dict[str, Finding]:
    return by_check(diagnose(df, config, Thresholds(**th) if th else None))


def test_healthy_run_triggers_nothing_and_every_check_reports_its_number():
    found = diagnose(frame(), SEED_CFG)
    assert [f.check for f in found] == CHECKS
    assert [f.check for f in found if f.triggered] == []
    frame_found = [f for f in found if f.check in FRAME_CHECKS]
    assert all(f.value is not None and f.threshold is not None for f in frame_found)
    assert all(f.message and not f.message.startswith("skipped") for f in frame_found)
    assert all(f.value is None and "needs the run's data" in f.message for f in found if f.check in DATA_CHECKS)


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
    assert not run(frame(reward=[2.4, 2.3, 2.3, 2.3, 2.3], acc=[0.36, 0.3, 0.3, 0.3, 0.3]))["reward_vs_label"].triggered


def test_reward_vs_label_also_compares_against_the_sft_baseline():
    # GRPO itself is fine, but RCE already traded labels for reward: SFT -> end shows it
    df = frame(sft_val={"acc@1": 0.40, "reward@1": 2.30})
    f = run(df)["reward_vs_label"]
    assert f.triggered and "SFT -> GRPO end" in f.message and "GRPO start -> end" in f.message


# ---------------------------------------------------------------- 7. RCE convergence


def test_rce_loss_still_falling_at_its_last_epoch_is_flagged():
    f = run(frame(rce_loss=[2.0, 1.8, 1.5]))["rce_converged"]
    assert f.triggered and f.value == pytest.approx(0.3 / 1.8)
    assert f.suggestion.startswith("rce.epochs=6") and f.switches == ["rce.epochs=6"]
    # an annealed temperature between the epochs is named as a confound
    g = run(frame(rce_loss=[2.0, 1.8, 1.5], rce_temperature=[1.75, 1.25, 0.75]))["rce_converged"]
    assert g.triggered and "overstates" in g.message


def test_reward_vs_label_is_invariant_to_a_shift_or_scaling_of_the_reward():
    df = frame(reward=[2.4, 2.5, 2.6, 2.7, 2.8], acc=[0.36, 0.35, 0.34, 0.33, 0.32])
    base = run(df)["reward_vs_label"]
    assert base.triggered
    for shift, scale in ((100.0, 1.0), (-2.4, 1.0), (-100.0, 1.0), (0.0, 0.01), (5.0, 50.0)):
        moved = df.assign(**{"reward@1": scale * df["reward@1"] + shift, "regret@1": scale * df["regret@1"]})
        f = run(moved)["reward_vs_label"]
        assert (f.triggered, f.value) == (base.triggered, pytest.approx(base.value)), (shift, scale)
    # without regret@1 the reward side is read off ndcg@5 (reward gains relative to the group minimum)
    no_regret = df.drop(columns=["regret@1"]).assign(**{"ndcg@5": 0.5 + (df["reward@1"] - 2.4)})
    assert run(no_regret)["reward_vs_label"].triggered


def sft_terms(splits, sft, t: float) -> tuple[float, float]:
    """(H(targets_T), KL(targets_T || SFT)) on the training split, written out with plain loops over groups."""
    import math

    model, sim_t = sft
    tr = splits.train
    with torch.no_grad():
        q, c = model.encode_query(tr.query_x), model.encode_candidates(tr.cand_x)
    h_sum = kl_sum = 0.0
    for b in range(len(tr)):
        idx = [j for j in range(tr.group_size) if tr.mask[b, j]]
        r = [float(tr.rewards[b, j]) / t for j in idx]
        z = [float(q[b] @ c[b, j]) / sim_t for j in idx]
        tg = [math.exp(x - max(r)) for x in r]
        tg = [x / sum(tg) for x in tg]
        lse = max(z) + math.log(sum(math.exp(x - max(z)) for x in z))
        h_sum += -sum(p * math.log(p) for p in tg if p > 0)
        kl_sum += sum(p * (math.log(p) - (x - lse)) for p, x in zip(tg, z) if p > 0)
    return h_sum / len(tr), kl_sum / len(tr)


def rce_frame(closed: list[float], kl: float, splits, sft, steps_per_epoch: int = 6) -> tuple[pd.DataFrame, list]:
    """A frame whose logged RCE loss at each step is H(targets_T) + (1 - c) * KL(targets_T || SFT) under the default
    annealed temperature, with the closed share c going linearly through ``closed`` (one value per epoch boundary,
    the first = 0 at SFT); also returns (epoch, c, gap) per step."""
    from v3kit.train.rce import annealed_temperature

    n_epochs = len(closed) - 1
    df = frame(rce_loss=[1.0] * n_epochs, steps_per_epoch=steps_per_epoch)
    rows = df.index[(df["stage"] == "rce") & (df["split"] == "train")]
    total, steps = len(rows), []
    for i, idx in enumerate(rows):
        t = annealed_temperature(i, total, 2.0, 0.5)
        pos = i / steps_per_epoch
        e = int(min(pos, n_epochs - 1))
        c = closed[e] + (closed[e + 1] - closed[e]) * (pos - e)
        h, gap = sft_terms(splits, sft, t)
        df.loc[idx, ["temperature", "loss"]] = [t, h + (1 - c) * gap]
        steps.append((e + 1, c, gap))
    df.loc[(df["stage"] == "rce") & (df["split"] == "val") & (df["epoch"] > 0), "kl_to_sft"] = kl
    return df, steps


def expected_closed(steps: list, epoch: int) -> float:
    sel = [(c, g) for e, c, g in steps if e == epoch]
    return sum(c * g for c, g in sel) / sum(g for _, g in sel)


@pytest.fixture(scope="module")
def small_splits():
    from v3kit.data import split_by_query
    from v3kit.data.synthetic import SyntheticConfig, make_world

    return split_by_query(make_world(SyntheticConfig(n_queries=100)), val_frac=0.2, test_frac=0.2, seed=0)


@pytest.fixture(scope="module")
def small_sft(small_splits):
    from v3kit.train.model import ModelConfig, build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(), small_splits.train.query_dim, small_splits.train.cand_dim), 1.0


RCE_CFG = {**SEED_CFG, "rce": {"epochs": 3, "lr": 1e-5, "t_start": 2.0, "t_end": 0.5}}


def test_rce_that_barely_moved_the_policy_says_the_lr_is_too_small(small_splits, small_sft):
    # a tiny lr: a linear 0.1% of the gap closed and the policy moved 1.7e-5 nats. The old check called this
    # "not converged, more epochs" (the last epoch gained as much as the average one).
    df, _ = rce_frame([0.0, 0.0003, 0.0007, 0.001], kl=1.7e-5, splits=small_splits, sft=small_sft)
    f = by_check(diagnose(df, RCE_CFG, splits=small_splits, sft=small_sft))["rce_converged"]
    assert f.triggered and "lr too small to move the policy" in f.message
    assert f.suggestion.startswith("rce.lr=0.0001") and f.switches == ["rce.lr=0.0001"]
    assert "rce.epochs" not in f.suggestion and f.value == pytest.approx(1.7e-5)
    # without the data or the SFT model (no floor) the KL alone says the same
    g = run(df, RCE_CFG)["rce_converged"]
    assert g.triggered and "lr too small" in g.message


def test_rce_is_judged_by_the_gap_to_its_floor_not_the_annealed_raw_loss(small_splits, small_sft):
    # the raw loss falls a lot (the temperature sharpens the targets) but RCE stopped closing its gap
    flat, steps = rce_frame([0.0, 0.3, 0.33, 0.335], kl=0.05, splits=small_splits, sft=small_sft)
    raw = flat[(flat["stage"] == "rce") & (flat["split"] == "train")].groupby("epoch")["loss"].mean()
    assert (raw.iloc[-2] - raw.iloc[-1]) / raw.iloc[-2] > 0.05  # the logged-loss rule reads this as "still falling"
    f = by_check(diagnose(flat, RCE_CFG, splits=small_splits, sft=small_sft))["rce_converged"]
    assert not f.triggered and "H(targets)" in f.message
    assert f.value == pytest.approx(expected_closed(steps, 3) - expected_closed(steps, 2), abs=1e-4)
    # a gap that is still closing fast is flagged, with more epochs to test
    falling, steps = rce_frame([0.0, 0.2, 0.4, 0.6], kl=0.05, splits=small_splits, sft=small_sft)
    g = by_check(diagnose(falling, RCE_CFG, splits=small_splits, sft=small_sft))["rce_converged"]
    assert g.triggered and g.switches == ["rce.epochs=6"]
    assert g.value == pytest.approx(expected_closed(steps, 3) - expected_closed(steps, 2), abs=1e-4)


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
    assert "-> test: grpo.drop_zero_std_groups=true" in text
    joined = " ".join(ln.strip() for ln in lines)
    assert "1. zero_std_groups: grpo.drop_zero_std_groups=true" in text
    assert "v3kit investigate RUN_DIR" in joined and "v3kit ablate --grid RUN_DIR/doctor_grid.yaml" in joined
    assert any(
        ln.startswith(f"1 of {len(CHECKS)} checks flagged: zero_std_groups; {len(DATA_CHECKS)} skipped") for ln in lines
    )
    assert "adopt a switch only once its ablation beats" in joined
    assert max(len(ln) for ln in lines) <= 100  # the report wraps for terminals and notebooks
    table = report_frame(found)
    assert list(table.columns) == ["check", "triggered", "value", "threshold", "message", "suggestion", "switches"]
    assert table.set_index("check").loc["zero_std_groups", "triggered"]
    assert table["triggered"].sum() == 1


# ---------------------------------------------------------------- a real run and the CLI


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    from v3kit.config import load_config
    from v3kit.pipeline import run_pipeline

    d = tmp_path_factory.mktemp("doctor") / "run"
    # RCE at a tiny lr: the case where the doctor must say "lr too small" with or without the RCE checkpoints
    cfg = load_config(
        None,
        [
            "progress=false",
            "data.synthetic.n_queries=300",
            "sft.epochs=3",
            "rce.epochs=2",
            "rce.lr=1e-7",
            "grpo.epochs=2",
            "grpo.lr=1e-3",
            f"run_dir={d}",
        ],
    )
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
    rce = found["rce_converged"]
    assert rce.triggered and "lr too small to move the policy" in rce.message and "H(targets)" in rce.message
    assert rce.switches == ["rce.lr=1e-06"]
    # every check had what it needs in a real run: nothing skipped
    assert all(f.value is not None for f in found.values())


def test_rce_verdict_is_the_same_without_the_per_epoch_checkpoints(real_run, tmp_path):
    import shutil

    copy = tmp_path / "ablation_copy"  # what an ablation folder keeps: no per-epoch checkpoints
    shutil.copytree(real_run, copy, ignore=shutil.ignore_patterns("*_epoch*.pt"))
    assert list(real_run.glob("rce_epoch*.pt")) and not list(copy.glob("*_epoch*.pt"))
    full, bare = by_check(diagnose(real_run)), by_check(diagnose(copy))
    for name in ("rce_converged", "reward_vs_label"):
        assert (bare[name].triggered, bare[name].value, bare[name].message) == (
            full[name].triggered,
            full[name].value,
            full[name].message,
        )


def test_doctor_grid_tests_the_suggestions_against_the_run(real_run, tmp_path, capsys):
    import yaml

    from v3kit.ablate import load_grid, run_grid

    assert main(["doctor", str(real_run), "--grid"]) == 0
    out = capsys.readouterr().out
    path = real_run / "doctor_grid.yaml"
    assert f"wrote {path}" in out and f"v3kit ablate --grid {path}" in out
    raw = yaml.safe_load(path.read_text())
    assert raw["reference"] == "run" and raw["variants"]["run"] == [] and "sft_only" in raw["variants"]
    assert raw["variants"]["lr_1e-06"] == ["rce.lr=1e-06"]  # rce_converged's switch
    assert "rce.lr=1.0e-07" in raw["base"] and "data.synthetic.n_queries=300" in raw["base"]
    assert not any(b.split("=")[0] in ("seed", "run_dir", "progress") for b in raw["base"])
    assert raw["sft_checkpoint"] == str((real_run / "sft.pt").resolve())  # every variant starts from the run's SFT
    spec = load_grid(path)
    assert spec.resolve("default", "run", 0).rce.lr == 1e-7
    # a tiny version of it runs
    tiny = load_grid(path, ["rce.epochs=1", "grpo.epochs=1"])
    tiny.seeds = [1]  # a run seed other than the shared SFT's (0)
    tiny.variants = {k: tiny.variants[k] for k in ("sft_only", "run", "lr_1e-06")}
    tiny.questions = {}
    res = run_grid(tiny, tmp_path / "abl", workers=1, progress=False)
    assert res.executed == 3 and set(res.frame["variant"]) == {"sft_only", "run", "lr_1e-06"}
    assert not (tmp_path / "abl" / "default" / "sft").exists()  # no SFT trained: the run's own was used
    sft_test = res.frame[(res.frame["split"] == "test") & (res.frame["stage"] == "sft")]
    run_summary = pd.read_csv(real_run / "summary.csv", index_col=0)
    assert sft_test["acc@1"].iloc[0] == pytest.approx(run_summary.loc["sft", "acc@1"])  # same SFT, same test split
    # the doctor on an ablation run rebuilds the split it trained on (the shared SFT's), not one from its own seed
    from v3kit.diagnose import DoctorContext, load_run
    from v3kit.pipeline import prepare_data

    run1 = res.run_dir("run", 1)
    df, cfg = load_run(run1)
    ctx = DoctorContext(df, cfg, Thresholds(), run1)
    want = prepare_data(tiny.resolve("default", "run", 0)).train.query_ids
    assert ctx.data().train.query_ids == want != prepare_data(tiny.resolve("default", "run", 1)).train.query_ids


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


def test_every_check_ignores_a_constant_reward_shift_and_names_its_scale(small_splits, small_sft):
    import dataclasses

    from v3kit.data import Splits

    def moved(splits, a: float, c: float):
        return Splits(
            *[
                dataclasses.replace(p, rewards=torch.where(p.mask, a * p.rewards + c, 0.0))
                for p in (splits.train, splits.val, splits.test)
            ]
        )

    df, _ = rce_frame([0.0, 0.2, 0.3, 0.35], kl=0.05, splits=small_splits, sft=small_sft)
    df = df.assign(**{"reward@1": df["reward@1"] + 0.1 * df["epoch"], "regret@1": df["regret@1"] - 0.1 * df["epoch"]})

    def verdicts(a: float, c: float) -> dict[str, tuple]:
        d = df.assign(**{"reward@1": a * df["reward@1"] + c, "regret@1": a * df["regret@1"]})
        found = diagnose(d, RCE_CFG, splits=moved(small_splits, a, c), sft=small_sft)
        return {f.check: (f.triggered, None if f.value is None else round(f.value, 4)) for f in found}

    base = verdicts(1.0, 0.0)
    assert all(v[1] is not None for v in base.values())  # every check ran
    assert verdicts(1.0, 100.0) == base and verdicts(1.0, -7.0) == base
    scaled = verdicts(30.0, 5.0)
    # RCE's targets are a softmax of reward / T: their checks depend on the reward's scale, and say so
    assert {k: v for k, v in scaled.items() if k not in ("rce_targets", "rce_converged")} == {
        k: v for k, v in base.items() if k not in ("rce_targets", "rce_converged")
    }
    found = {f.check: f for f in diagnose(df, RCE_CFG, splits=small_splits, sft=small_sft)}
    assert "T in raw reward units" in found["rce_targets"].message
    assert "T in raw reward units" in found["rce_converged"].message


def test_only_runs_the_named_checks_and_refuses_unknown_names():
    found = diagnose(frame(zero_std=lambda t: 0.5), SEED_CFG, only=["zero_std_groups", "clip_ratio"])
    assert [f.check for f in found] == ["clip_ratio", "zero_std_groups"]  # in report order
    assert found[1].triggered
    with pytest.raises(ValueError, match="unknown doctor check"):
        diagnose(frame(), SEED_CFG, only=["rce_convergence"])


def test_suggestions_are_ordered_by_evidence():
    from v3kit.diagnose import evidence_order

    def f(check, value, threshold):
        return Finding(check, True, value, threshold, "", "", [f"x.{check}=1"])

    found = [
        f("clip_ratio", 0.9, 0.2),
        f("reward_shortcut", 0.4, 0.05),
        f("baselines", 0.39, 0.45),
        f("kl_pinned", 100.0, 1.0),
        f("rce_converged", 0.001, 0.01),
    ]
    # label metric first, then the data checks by how far past their threshold, then GRPO's mechanics
    assert [x.check for x in evidence_order(found)] == [
        "baselines",
        "rce_converged",
        "reward_shortcut",
        "kl_pinned",
        "clip_ratio",
    ]


def test_the_doctor_reads_only_keys_the_typed_config_has():
    import pytest as _pytest

    from v3kit.doctor.context import REGISTRY, REPORT_ORDER, ConfigView, DoctorContext, UnknownConfigKey

    assert ConfigView({"grpo": {"kl_beta": 0.5}}).grpo.kl_beta == 0.5
    assert ConfigView({}).grpo.kl_beta is None  # a partial config: unknown, not the default
    assert ConfigView({"data": {"synthetic": {"n_queries": 7}}}).data.synthetic.n_queries == 7  # nested sections
    assert DoctorContext(pd.DataFrame(), {"rce": {"lr": 0.1}}, None).cfg.rce.lr == 0.1
    with _pytest.raises(UnknownConfigKey, match="grpo.kl_bta"):
        _ = ConfigView({"grpo": {"kl_bta": 0.5}}).grpo.kl_bta  # a renamed or misspelled field fails loudly
    with _pytest.raises(UnknownConfigKey, match="gpro"):
        _ = ConfigView({}).gpro
    # The report's order is declared, and every registered check is in it.
    assert set(REGISTRY) == set(REPORT_ORDER) and len(REPORT_ORDER) == len(set(REPORT_ORDER))


def test_no_check_reads_the_config_by_string_key():
    # Checks read ctx.cfg's typed attributes; a dotted string look-up would skip the typed config's check.
    import re

    import v3kit.doctor.data_checks as dc
    import v3kit.doctor.grpo_checks as gc

    for mod in (dc, gc):
        src = open(mod.__file__).read()
        assert not re.search(r"config(_value)?\(|\.config\[|config\.get\(\"(?!rce\")", src), mod.__name__
