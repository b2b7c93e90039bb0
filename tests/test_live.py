"""Live plotting (throttling, headless fallback), the plateau check, stage-1 diagnostics, and the GRPO comparison
panel driven from Python the way a click would drive it."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from v3kit.data import GroupData
from v3kit.data.reward_stats import label_reward_agreement, label_reward_rank, reward_spread
from v3kit.doctor.rce_analysis import add_rce_floor, plateau_check, rce_target_entropy
from v3kit.notebook.live import LivePlot, Throttle, plot_history
from v3kit.notebook.plots import Panel, grpo_panels, plot_ratio_hist, plot_stage1


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# ----------------------------------------------------------------------------------------------- throttle
def test_throttle_needs_both_steps_and_seconds():
    clock = FakeClock()
    th = Throttle(every_steps=10, every_seconds=1.0, max_overhead=0.25, clock=clock)
    clock.t = 5.0
    assert not th.ready(9)  # enough time, too few steps
    clock.t = 0.5
    assert not th.ready(50)  # enough steps, too little time
    clock.t = 1.0
    assert th.ready(10)
    th.mark(10, cost=0.0)
    clock.t = 1.9
    assert not th.ready(40)
    clock.t = 2.0
    assert th.ready(20)


def test_throttle_backs_off_after_a_slow_redraw():
    clock = FakeClock()
    th = Throttle(every_steps=1, every_seconds=0.5, max_overhead=0.25, clock=clock)
    th.mark(0, cost=2.0)  # a 2 s redraw may take at most 25% of the time: wait 6 s
    assert th.wait_seconds() == pytest.approx(6.0)
    clock.t = 5.9
    assert not th.ready(100)
    clock.t = 6.0
    assert th.ready(100)


def _drive(plot: LivePlot, clock: FakeClock, steps: int, dt: float, stage: str = "grpo") -> None:
    plot.on_stage_start(stage, steps, {"epochs": 2, "steps_per_epoch": steps // 2})
    plot.on_eval({"stage": stage, "split": "val", "epoch": 0, "step": 0, "acc@1": 0.3, "reward@1": 1.0})
    for s in range(1, steps + 1):
        clock.t += dt
        plot.on_step(
            {
                "stage": stage,
                "split": "train",
                "epoch": 1 + (s - 1) // (steps // 2),
                "step": s,
                "loss": 1.0 / s,
                "pg_loss": -0.1,
                "kl": 0.01 * s,
                "ratio_mean": 1.0,
                "ratio_min": 0.9,
                "ratio_max": 1.1,
                "clip_ratio": 0.1,
                "entropy": 1.5,
            }
        )
        if s % (steps // 2) == 0:
            plot.on_eval(
                {
                    "stage": stage,
                    "split": "val",
                    "epoch": s // (steps // 2),
                    "step": s,
                    "acc@1": 0.3 + 0.01 * s,
                    "reward@1": 1.0 + 0.01 * s,
                }
            )
    plot.on_stage_end(stage, None)


def test_live_plot_redraws_at_most_every_n_steps_and_t_seconds():
    one = (Panel("loss", ("loss",)), Panel("acc", ("acc@1",), "eval"))  # small figure: the test counts, not looks
    clock = FakeClock()
    plot = LivePlot(one, live=True, display=False, every_steps=5, every_seconds=1.0, clock=clock)
    _drive(plot, clock, steps=100, dt=0.1)  # 10 s of training: the 1 s limit binds, not the 5 steps
    # One per second of training (evals fall on those same moments, so they wait) + 1 final; none at start.
    assert 9 <= plot.redraws <= 11, plot.redraws
    assert len(plot.train_rows) == 100 and len(plot.eval_rows) == 3

    clock = FakeClock()
    plot = LivePlot(one, live=True, display=False, every_steps=25, every_seconds=0.0, clock=clock)
    _drive(plot, clock, steps=100, dt=0.1)  # now the step limit binds: redraws at steps 25, 50, 75, 100
    # steps 25/50/75/100 + final, and the three evals (no time limit here, and evals ignore the step one)
    assert plot.redraws == 4 + 1 + 3, plot.redraws


def test_headless_plot_draws_once_at_the_end():
    clock = FakeClock()
    plot = LivePlot(grpo_panels(), live=False, display=False, every_steps=1, every_seconds=0.0, clock=clock)
    _drive(plot, clock, steps=40, dt=1.0)
    assert plot.redraws == 1
    axes = [ax for ax in plot.figure.axes if ax.get_visible()]
    assert len(axes) == 8  # these rows have no utility@1 (as real data): its optional panel is left out
    titles = [ax.get_title() for ax in axes]
    assert "GRPO loss" in titles and "held-out acc@1" in titles
    loss_ax = axes[titles.index("GRPO loss")]
    assert loss_ax.get_xlabel() == "step" and len(loss_ax.lines) >= 2  # raw + moving average
    acc_ax = axes[titles.index("held-out acc@1")]
    assert any("baseline" in (line.get_label() or "") for line in acc_ax.lines)  # epoch-0 baseline line


def test_stage_filter_ignores_other_stages():
    plot = LivePlot(stages=["rce"], live=True, display=False, every_steps=1, every_seconds=0.0)
    plot.on_stage_start("sft", 10, {})
    plot.on_step({"stage": "sft", "split": "train", "epoch": 1, "step": 1, "loss": 1.0})
    plot.on_stage_end("sft", None)
    assert plot.redraws == 0 and plot.train_rows == []


def test_plot_history_from_metrics_rows():
    rows = [{"stage": "rce", "split": "val", "epoch": 0, "step": 0, "acc@1": 0.2, "reward@1": 1.0}]
    rows += [
        {"stage": "rce", "split": "train", "epoch": 1, "step": s, "loss": 2 - 0.1 * s, "temperature": 2 - 0.1 * s}
        for s in range(1, 11)
    ]
    rows += [{"stage": "sft", "split": "train", "epoch": 1, "step": 1, "loss": 9.0}]
    fig = plot_history(pd.DataFrame(rows), "rce")
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert "reward temperature T" in titles
    temp_ax = fig.axes[titles.index("reward temperature T")]
    assert np.allclose(temp_ax.lines[0].get_ydata(), [2 - 0.1 * s for s in range(1, 11)])


# ----------------------------------------------------------------------------------------------- plateau check
def test_plateau_check_falling_plateau_rising():
    falling = plateau_check([2.0] * 10 + [1.0] * 10, k=10)
    assert falling.status == "falling" and falling.still_falling
    assert falling.previous_mean == 2.0 and falling.last_mean == 1.0 and falling.rel_change == pytest.approx(-0.5)
    flat = plateau_check([1.0, 1.004] * 10, k=10, rel_tol=0.01)
    assert flat.status == "plateau" and not flat.still_falling
    assert plateau_check([1.0] * 10 + [1.1] * 10, k=10).status == "rising"
    # Only the last 2k values count: an early fall followed by a flat tail is a plateau.
    assert plateau_check([5.0] * 10 + [1.0] * 20, k=10).status == "plateau"
    assert plateau_check([1.0, 2.0, 3.0], k=2).status == "too short"
    # Default k = a quarter of the curve; NaNs are ignored.
    auto = plateau_check([3.0, np.nan, 3.0, 3.0, 3.0, 2.0, 2.0, 2.0, 2.0])
    assert auto.k == 2 and auto.status == "plateau"
    assert "->" in str(falling) and "+-1.0%" in str(falling)


def _groups() -> GroupData:
    rewards = torch.tensor([[3.0, 1.0, 2.0, 0.0], [1.0, 5.0, 0.0, 0.0], [2.0, 2.0, 2.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False], [True, True, True, False]])
    rewards = torch.where(mask, rewards, torch.zeros_like(rewards))
    return GroupData(
        query_x=torch.zeros(3, 2),
        cand_x=torch.zeros(3, 4, 2),
        mask=mask,
        labels=torch.tensor([0, 2, 1]),
        rewards=rewards,
        query_ids=["a", "b", "c"],
    )


def test_label_reward_rank_and_agreement():
    d = _groups()
    # group a: label has the top reward; b: label is the worst of 3 real candidates (padding ignored); c: all tied.
    assert label_reward_rank(d).tolist() == [1, 3, 1]
    assert label_reward_agreement(d) == pytest.approx(2 / 3)
    spread = reward_spread(d)
    assert spread[2] == 0.0 and spread[0] == pytest.approx(float(torch.tensor([3.0, 1, 2, 0]).std()))


def test_rce_target_entropy_is_the_loss_floor():
    d = _groups()
    n_valid = d.mask.sum(1).float()
    # Very soft targets -> uniform -> entropy log(n); very sharp -> one-hot (tied group c stays uniform).
    assert rce_target_entropy(d, 1e6) == pytest.approx(float(torch.log(n_valid).mean()), rel=1e-4)
    assert rce_target_entropy(d, 1e-3) == pytest.approx(float(math.log(3) / 3), rel=1e-3)
    assert rce_target_entropy(d, 2.0) > rce_target_entropy(d, 0.5)
    assert rce_target_entropy(d, 0.5, label_weight=1.0) == pytest.approx(0.0, abs=1e-6)

    from v3kit.train.rce import RCEConfig

    hist = pd.DataFrame(
        {"split": ["train", "train", "val"], "loss": [2.0, 1.5, np.nan], "temperature": [2.0, 0.5, np.nan]}
    )
    out = add_rce_floor(hist, d, RCEConfig())
    assert len(out) == 2
    assert out["excess_loss"].tolist() == pytest.approx(
        [2.0 - rce_target_entropy(d, 2.0), 1.5 - rce_target_entropy(d, 0.5)]
    )


def test_diagnostic_figures_have_labels():
    d = _groups()
    old = torch.log_softmax(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).masked_fill(~d.mask, -1e9), 1)
    fig = plot_stage1(old.masked_fill(~d.mask, float("-inf")), d)
    assert len(fig.axes) == 3 and all(ax.get_title() and ax.get_xlabel() for ax in fig.axes)
    assert "67%" in fig.axes[2].get_title()
    fig = plot_ratio_hist(torch.tensor([0.5, 1.0, 1.1, 3.0]), 0.2)
    assert "50.0% outside" in fig.axes[0].get_title()
    fig = plot_ratio_hist(torch.ones(10), 0.2)  # a refreshed old policy: every ratio is exactly 1
    assert "0.0% outside" in fig.axes[0].get_title()


# ----------------------------------------------------------------------------------------------- compare panel
@pytest.fixture(scope="module")
def start(tmp_path_factory):
    from v3kit.notebook.grpo_panel import GRPOStart
    from v3kit.notebook.tools import notebook_config
    from v3kit.pipeline import prepare_data
    from v3kit.stage_reuse import ensure_rce, ensure_stage1

    cfg = notebook_config(
        run_dir=str(tmp_path_factory.mktemp("panel")),
        smoke=True,
        n_queries=80,
        sft_epochs=2,
        rce_epochs=1,
        grpo_epochs=1,
        rce_lr=1e-3,
        grpo_lr=1e-3,
    )
    splits = prepare_data(cfg)
    stage1 = ensure_stage1(cfg, splits)
    rce = ensure_rce(cfg, splits, stage1)
    return GRPOStart.from_stages(cfg, splits, stage1, rce.model)


def test_compare_panel_click_adds_a_curve_and_a_row(start):
    from v3kit.notebook.grpo_panel import ComparePanel

    panel = ComparePanel(start, live=False)
    before = {k: v.clone() for k, v in start.model.state_dict().items()}
    panel.kl_beta.value = 0.0
    panel.button.click()  # what the browser does: calls the on_click handler
    loss_ax, acc_ax = panel.figure.axes[0], panel.figure.axes[3]
    lines0, acc0 = len(loss_ax.lines), len(acc_ax.lines)
    assert len(panel.table) == 1 and lines0 == 1
    image0 = panel.image.value

    panel.set(kl_beta=0.5)  # on the log slider
    panel.eps_high.value = 0.3
    panel.button.click()
    assert len(panel.table) == 2
    loss_ax, acc_ax = panel.figure.axes[0], panel.figure.axes[3]  # the figure is redrawn from scratch
    assert len(loss_ax.lines) == lines0 + 1 and len(acc_ax.lines) == acc0 + 1  # a new curve in each panel
    assert panel.table["kl_beta"].tolist() == [0.0, 0.5]
    assert panel.table.iloc[1]["eps_high"] == 0.3
    assert {"acc@1", "reward@1", "kl_to_sft", "step0_outside_clip"} <= set(panel.table.columns)
    labels = [line.get_label() for line in loss_ax.lines]
    assert labels == ["#1 kl_beta=0, eps_high=0.2", "#2 kl_beta=0.5, eps_high=0.3"]  # legend names what differs
    assert panel.image.value != image0 and "#2" in panel.table_html.value
    # Every run trains a copy: the shared post-RCE start is untouched.
    assert all(torch.equal(before[k], v) for k, v in start.model.state_dict().items())


def test_compare_panel_runs_are_reproducible_and_grid_uses_the_same_path(start):
    from v3kit.notebook.grpo_panel import ComparePanel

    panel = ComparePanel(start, live=True, every_seconds=0.0)  # live redraws during the run must not break it
    runs = panel.run_grid(kl_beta=[0.1, 0.1, 0.003])  # 0.003 is on the slider; runs 1 and 2 are identical
    assert [r.settings["kl_beta"] for r in runs] == [0.1, 0.1, 0.003]
    assert runs[0].final == runs[1].final
    assert len(panel.figure.axes[0].lines) == 3
    assert panel.kl_beta.value == 0.003
    panel.set(kl_beta=0.07)  # not on the slider: added to its options
    assert 0.07 in [v for _, v in panel.kl_beta.options]
    with pytest.raises(ValueError, match="unknown setting"):
        panel.set(kl_betaa=0.1)
    with pytest.raises(ValueError, match="exactly one setting"):
        panel.run_grid(kl_beta=[0.1], lr=[1e-3])
