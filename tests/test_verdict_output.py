"""What a verdict shows: the effects plot's title fits its figure, and a power line with nothing to measure says so
instead of 'effects smaller than ~0 go undetected'."""

from __future__ import annotations

import pandas as pd
import pytest

from v3kit.doctor.confirm import power_line
from v3kit.doctor.verdict_report import Verdict, plot_effects


def test_the_effects_plot_title_fits_inside_the_figure(tmp_path, monkeypatch):
    plt = pytest.importorskip("matplotlib.pyplot")
    names = ["run", "sft_only", "debias_candidate_features_and_reward_prior", "rce_grpo_anchored_with_refresh"]
    table = pd.DataFrame(
        {
            "variant": names,
            "verdict": ["n.s.", "", "better", "worse"],
            "vs_sft": [0.0, 0.0, 0.05, -0.02],
            "vs_sft_low": [-0.01, 0.0, 0.01, -0.04],
            "vs_sft_high": [0.01, 0.0, 0.09, -0.001],
        }
    )
    v = Verdict("acc@1", "variant", names[2], "x.yaml", [0.05, 0.01, 0.09], [0.05, 0.01, 0.09], [], "", table)
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to measure it
    plot_effects(v, tmp_path / "effects.png")
    assert (tmp_path / "effects.png").is_file()
    fig = figures[0]
    renderer = fig.canvas.get_renderer()
    titles = [t for t in (fig._suptitle, fig.axes[0].title) if t is not None and t.get_text()]
    assert len(titles) == 1
    text = "".join(titles[0].get_text().split())
    assert text == "".join(f"verdict: variant ({names[2]})".split())
    box, frame = titles[0].get_window_extent(renderer), fig.bbox
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
    for label in fig.axes[0].get_yticklabels():  # the variant names fit too
        assert label.get_window_extent(renderer).x0 >= frame.x0
    plt.close(fig)


def test_a_power_line_with_nothing_to_measure_says_so():
    # finalists whose intervals all have zero width (a smoke run): no effect can be detected, and the line says so
    zero = power_line(12, 0.15, 2, "acc@1", [0.0, 0.0])
    assert "too few test queries to detect any effect" in zero and "~0" not in zero
    assert "too few test queries" in power_line(12, 0.15, 2, "acc@1", [float("nan")])
    real = power_line(12, 0.15, 2, "acc@1", [0.0, 0.083])
    assert "mde column" in real and "too few" not in real
