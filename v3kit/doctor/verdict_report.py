"""A verdict and its outputs: :class:`Verdict`, ``verdict.md`` (the recommendation, the variants, the reference
rankers, the causes), ``verdict.json`` and the forest plot ``effects.png`` (see :mod:`v3kit.doctor.investigate`,
which makes the verdict)."""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..rundir import atomic_write, atomic_write_text, json_text

VERDICT_MD, VERDICT_JSON = "verdict.md", "verdict.json"
SFT_ONLY = "sft_only"  # the reference variant every effect is measured against (not plotted: it is the zero line)


@dataclass
class Verdict:
    metric: str
    recommendation: str
    variant: str  # the recommended variant (sft_only for keep_sft)
    config: str  # path of the YAML `v3kit run --config` trains as is
    effect_vs_sft: list[float]  # [mean, lo, hi]
    effect_vs_run: list[float]
    causes: list[dict[str, Any]]
    why: str
    table: pd.DataFrame = field(repr=False)
    references: dict[str, float] = field(default_factory=dict)
    runs: int = 0
    wall_s: float = 0.0
    power: str = ""
    sft: str = ""  # the run's SFT checkpoint, every effect_vs_sft's baseline
    run_seconds: float = 0.0  # the runs' own wall times added up (all rounds, also those of earlier invocations)

    def as_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "recommendation": self.recommendation,
            "variant": self.variant,
            "config": self.config,
            "effect_vs_sft": self.effect_vs_sft,
            "effect_vs_run": self.effect_vs_run,
            "causes": self.causes,
            "why": self.why,
            "references": self.references,
            "runs": self.runs,
            "wall_s": round(self.wall_s, 1),
            "run_seconds": round(self.run_seconds, 1),
            "power": self.power,
            "sft": self.sft,
            "variants": json.loads(self.table.to_json(orient="records")),
        }


def verdict_markdown(v: Verdict, run_dir: Path, out: Path) -> str:
    lines = [f"# Verdict for `{run_dir}`", ""]
    head = {
        "keep_sft": "**Keep SFT.**",
        "rce_only": f"**Ship RCE only** (`{v.variant}`).",
        "variant": f"**Ship `{v.variant}`.**",
    }[v.recommendation]
    lines += [f"{head} {v.why}.", ""]
    lines += [
        f"- metric: `{v.metric}` on the run's test split; effect vs SFT "
        f"{v.effect_vs_sft[0]:+.4f} [{v.effect_vs_sft[1]:+.4f}, {v.effect_vs_sft[2]:+.4f}], vs the run "
        f"{v.effect_vs_run[0]:+.4f} [{v.effect_vs_run[1]:+.4f}, {v.effect_vs_run[2]:+.4f}]",
        f"- train it: `v3kit run --config {v.config}`",
        f"- {v.runs} runs ({v.run_seconds / 60:.1f} run-minutes), {v.wall_s / 60:.1f} min of wall time in this "
        "invocation; intervals: 95% paired bootstrap over seeds x test queries",
        f"- {v.power}",
        "",
    ]
    lines += [
        "## Variants (the shipped model of each run, vs SFT)",
        "",
        f"| variant | kind | seeds | {v.metric} | vs SFT [95% CI] | verdict | what it tests |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in v.table.to_dict("records"):
        lines.append(
            f"| {d['variant']} | {d['kind']} | {d['seeds']} | {d[v.metric]:.4f} | {d['vs_sft']:+.4f} "
            f"[{d['vs_sft_low']:+.4f}, {d['vs_sft_high']:+.4f}] | {d['verdict']} | {d['what']} |"
        )
    if v.references:
        lines += ["", "## Reference rankers (test split, no training)", "", f"| ranker | {v.metric} |", "|---|---|"]
        lines += [f"| {k} | {x:.4f} |" for k, x in v.references.items()]
    if v.causes:
        lines += [
            "",
            "## Causes the doctor flagged, ranked by the effect of their remedy on the run",
            "",
            "| check | remedy tested | effect vs run [95% CI] |",
            "|---|---|---|",
        ]
        for c in v.causes:
            e = c["effect_vs_run"]
            eff = f"{e[0]:+.4f} [{e[1]:+.4f}, {e[2]:+.4f}]" if e else "not tested (no switch)"
            lines.append(f"| {c['check']} | {c['remedy'] or '-'} | {eff} |")
    if (out / "effects.png").exists():
        lines += ["", "![effects](effects.png)"]
    return "\n".join(lines) + "\n"


def plot_effects(v: Verdict, path: Path) -> None:
    """Forest plot: each variant's effect vs SFT with its interval."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    t = v.table[v.table["variant"] != SFT_ONLY].iloc[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(t) + 1.2))
    y = np.arange(len(t))
    colors = ["tab:green" if r == "better" else "tab:red" if r == "worse" else "tab:gray" for r in t["verdict"]]
    ax.errorbar(
        t["vs_sft"], y, xerr=[t["vs_sft"] - t["vs_sft_low"], t["vs_sft_high"] - t["vs_sft"]], fmt="none", ecolor=colors
    )
    ax.scatter(t["vs_sft"], y, c=colors, zorder=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, t["variant"])
    ax.set_xlabel(f"{v.metric}: shipped model - SFT (95% CI)")
    # Long variant names narrow the axes; a title centred over them ran off the figure. A figure title wrapped to
    # the figure's width fits whatever the labels take.
    chars = max(20, int(fig.get_figwidth() * 72 / (0.6 * 1.2 * plt.rcParams["font.size"])))
    fig.suptitle(textwrap.fill(f"verdict: {v.recommendation} ({v.variant})", chars), fontsize="large")
    fig.tight_layout()
    try:  # atomic like every file v3kit writes: a full disk leaves no half a png
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)


def write_verdict(v: Verdict, run_dir: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    try:
        plot_effects(v, out / "effects.png")
    except ImportError:  # matplotlib is an extra (notebooks): the verdict stands without its plot
        pass
    atomic_write_text(out / VERDICT_JSON, json_text(v.as_json()))
    atomic_write_text(out / VERDICT_MD, verdict_markdown(v, run_dir, out))
