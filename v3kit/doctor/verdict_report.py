"""A verdict and its outputs: :class:`Verdict`, ``verdict.md`` (the recommendation, the variants, the reference
rankers, the causes), ``verdict.json`` and the forest plot ``effects.png`` (see :mod:`v3kit.doctor.investigate`,
which makes the verdict)."""

from __future__ import annotations

import json
import math
import textwrap
import warnings
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
    run_seconds: float = 0.0  # the confirm runs' own wall times added up
    sentence: str = ""  # the verdict in one plain sentence
    search: dict[str, Any] = field(default_factory=dict)  # trial counts, wall time, the space
    notes: list[str] = field(default_factory=list)
    seed_effects: list[float] = field(default_factory=list)  # the recommendation's per-seed effects vs SFT

    def as_json(self) -> dict[str, Any]:
        table = self.table.drop(columns=["seed_effects"], errors="ignore")
        return {
            "metric": self.metric,
            "recommendation": self.recommendation,
            "variant": self.variant,
            "config": self.config,
            "sentence": self.sentence,
            "effect_vs_sft": self.effect_vs_sft,
            "effect_vs_run": self.effect_vs_run,
            "seed_effects": self.seed_effects,
            "causes": self.causes,
            "why": self.why,
            "notes": self.notes,
            "references": self.references,
            "runs": self.runs,
            "wall_s": round(self.wall_s, 1),
            "run_seconds": round(self.run_seconds, 1),
            "power": self.power,
            "sft": self.sft,
            "search": self.search,
            "variants": json.loads(table.to_json(orient="records")),
        }


def _effect_cell(d: dict[str, Any]) -> str:
    """The effect vs SFT, or "kept SFT in k of n seeds" for a variant whose shipped model was the SFT you have."""
    cell = f"{d['vs_sft']:+.4f} [{d['vs_sft_low']:+.4f}, {d['vs_sft_high']:+.4f}]"
    kept, n = int(d.get("kept_sft") or 0), int(d.get("seeds") or 0)
    if d.get("own_sft") or kept == 0 or d["variant"] == SFT_ONLY:
        return "" if d["variant"] == SFT_ONLY else cell
    return f"kept SFT in {kept} of {n} seeds" if kept == n else f"{cell} (kept SFT in {kept} of {n} seeds)"


def _num(x: Any, fmt: str) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def verdict_markdown(v: Verdict, run_dir: Path, out: Path) -> str:
    lines = [f"# Verdict for `{run_dir}`", "", v.sentence, ""]
    head = {
        "keep_sft": "**Keep SFT.**",
        "rce_only": f"**Ship RCE only** (`{v.variant}`).",
        "variant": f"**Ship `{v.variant}`.**",
    }[v.recommendation]
    s = v.search
    family = int(v.table["p_holm"].notna().sum()) if "p_holm" in v.table.columns else 0
    lines += [f"{head} {v.why}.", ""]
    lines += [
        f"- metric: `{v.metric}` on the run's test split; effect vs SFT "
        f"{v.effect_vs_sft[0]:+.4f} [{v.effect_vs_sft[1]:+.4f}, {v.effect_vs_sft[2]:+.4f}], vs the run "
        f"{v.effect_vs_run[0]:+.4f} [{v.effect_vs_run[1]:+.4f}, {v.effect_vs_run[2]:+.4f}]",
        f"- train it: `v3kit run --config {v.config}`",
        f"- search (val only, one seed per trial): {s.get('trials', 0)} trials ({s.get('complete', 0)} complete, "
        f"{s.get('pruned', 0)} pruned, {s.get('failed', 0)} failed"
        + (f"; {s['stacked']} trained in stacks" if s.get("stacked") else "")
        + (f"; one at a time: {s['stack_note']}" if s.get("stack_note") else "")
        + "".join(f"; {a} shared {n}'s trial (the same config)" for a, n in (s.get("aliases") or {}).items())
        + f") over {len(s.get('params', []))} parameters in {s.get('wall_s', 0) / 60:.1f} min",
        f"- confirm (test, fresh seeds): {v.runs} runs ({v.run_seconds / 60:.1f} run-minutes); "
        f"{v.wall_s / 60:.1f} min of wall time for both phases in this invocation",
        f"- intervals: 95% paired bootstrap over seeds x test queries; the {family} comparisons of shippable "
        "candidates with SFT are corrected for multiplicity with Holm's method (the Holm p column), and "
        "'better' means better after that correction",
        f"- {v.power}",
        *[f"- note: {n}" for n in v.notes],
        "",
        "## Candidates (the shipped model of each run, vs SFT, on test)",
        "",
        f"| variant | kind | seeds | {v.metric} | vs SFT [95% CI] | Holm p | verdict | mde | search val | what |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in v.table.to_dict("records"):
        lines.append(
            f"| {d['variant']} | {d['kind']} | {d['seeds']} | {d[v.metric]:.4f} | {_effect_cell(d)} | "
            f"{_num(d.get('p_holm'), '.3f')} | {d['verdict']} | {_num(d.get('mde'), '.3f')} | "
            f"{_num(d.get('search_val'), '.4f')} | {d['what']} |"
        )
    if v.references:
        lines += ["", "## Reference rankers (test split, no training)", "", f"| ranker | {v.metric} |", "|---|---|"]
        lines += [f"| {k} | {x:.4f} |" for k, x in v.references.items()]
    if v.causes:
        lines += [
            "",
            "## Causes the doctor flagged, ranked by their best switch in the search",
            "",
            "(val, one seed per trial, minus the run's own trial: a ranking, not a verdict)",
            "",
            "| check | switch tried | val vs run |",
            "|---|---|---|",
        ]
        for c in v.causes:
            e = c.get("val_vs_run")
            lines.append(f"| {c['check']} | {c['remedy'] or '-'} | {_num(e, '+.4f') or 'not tried'} |")
    if s.get("importances"):
        top = sorted(s["importances"].items(), key=lambda kv: -kv[1])[:6]
        lines += ["", "Parameter importances (Optuna, fANOVA on the search's val scores): "]
        lines[-1] += ", ".join(f"`{k}` {x:.2f}" for k, x in top)
    for name, title in FIGURES:
        if (out / name).exists():
            lines += ["", f"![{title}]({name})"]
    return "\n".join(lines) + "\n"


FIGURES = (
    ("effects.png", "effects"),
    ("search_history.png", "optimisation history"),
    ("search_importances.png", "parameter importances"),
)


def plot_search(study: Any, out: Path) -> None:
    """Optuna's optimisation history and parameter importances as matplotlib figures."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ov

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for name, fn in (("search_history.png", ov.plot_optimization_history), ("search_importances.png", None)):
            try:
                ax = fn(study) if fn else ov.plot_param_importances(study)
            except Exception:  # too few finished trials to plot or rank: the verdict stands without it
                continue
            ax.figure.set_size_inches(7, 4)
            ax.figure.tight_layout()
            ax.figure.savefig(out / name, dpi=110)
            plt.close(ax.figure)


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


def write_verdict(v: Verdict, run_dir: Path, out: Path, study: Any = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    try:
        plot_effects(v, out / "effects.png")
        if study is not None:
            plot_search(study, out)
    except ImportError:  # matplotlib is an extra (notebooks): the verdict stands without its plots
        pass
    atomic_write_text(out / VERDICT_JSON, json_text(v.as_json()))
    atomic_write_text(out / VERDICT_MD, verdict_markdown(v, run_dir, out))
