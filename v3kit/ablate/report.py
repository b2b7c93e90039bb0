"""Text report of a grid: the summary table and the conclusions generated from its intervals."""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from .grid import BASE_WORLD, KEY_METRICS, METRIC_DIRECTION, SUMMARY_METRICS


def _fmt_diff(d: float, lo: float, hi: float) -> str:
    return f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def conclusions(
    summary: pd.DataFrame,
    *,
    metrics: Sequence[str] = KEY_METRICS,
    reference: str | None = None,
    world: str = BASE_WORLD,
    comparisons: pd.DataFrame | None = None,
    sft_variant: str | None = None,
) -> str:
    """A plain-text verdict generated from :func:`summarize`'s numbers (nothing hand-written that could go stale):
    which variants are significantly better/worse than SFT and than ``reference`` on each metric, the answers to
    the grid's questions, and, when the summary has several worlds, where the swept variants help or hurt.
    ``sft_variant`` (the variant that is SFT itself; default: the one whose difference to SFT is exactly 0 on every
    metric) is left out of the lists."""
    reference = reference or summary.attrs.get("reference")
    has_utility = "utility@1" in set(summary["metric"])
    if not has_utility and tuple(metrics) == KEY_METRICS:  # real data: the label metrics carry the verdict
        metrics = ("acc@1", "mrr", "reward@1")
    s = summary[(summary["world"] == world) & summary["metric"].isin(metrics)]
    if s.empty:
        return f"No results for world {world!r}."
    if sft_variant is None:  # a variant identical to SFT on every metric (no RCE, no GRPO) is the baseline itself
        same = s.groupby("variant")[["diff", "diff_low", "diff_high"]].apply(lambda g: bool((g == 0).all().all()))
        sft_variant = next(iter(same[same].index), None)
    lines = _header_lines(s, summary.attrs.get("reward_label_agreement", {}).get(world), has_utility, metrics, world)
    if reference is not None and reference in set(s["variant"]):
        lines.append(_reference_line(s, reference, metrics))
    s = s[s["variant"] != sft_variant]
    for m in metrics:
        sm = s[s["metric"] == m]
        if not sm.empty:
            lines += _metric_lines(sm, m, reference)
    if comparisons is not None and not comparisons.empty:
        lines.append("\nQuestions (paired difference a - b):")
        for q, grp in comparisons.groupby("question", sort=False):
            a, b = grp.iloc[0]["a"], grp.iloc[0]["b"]
            parts = [f"{r.metric} {_fmt_diff(r.diff, r.low, r.high)} {r.verdict}" for r in grp.itertuples()]
            lines.append(f"  {q} ({a} - {b}): " + "; ".join(parts))
    lines += _world_lines(summary, world, metrics)
    return "\n".join(lines)


def _header_lines(
    s: pd.DataFrame, agreement: float | None, has_utility: bool, metrics: Sequence[str], world: str
) -> list[str]:
    """What the verdicts rest on: the design, the reward-label agreement, the power, the multiple comparisons."""
    n_seeds = int(s["n_seeds"].min())
    method = ", ".join(sorted(s["ci_method"].unique()))
    lines = [
        f"World '{world}': {s['variant'].nunique()} variants x {n_seeds}+ seeds; 95% bootstrap CIs over "
        f"{method}; 'better'/'worse' = the CI of the paired difference excludes 0."
    ]
    if agreement is not None:
        lines.append(
            f"Reward vs label on the test split: the highest-reward candidate is the human label in "
            f"{agreement:.0%} of queries (reward-label disagreement {1 - agreement:.0%}); where they "
            "disagree, raising reward@1 can lower acc@1 and mrr."
        )
    if not has_utility:
        lines.append(
            "No true utility in this data: the verdicts read the label metrics (acc@1, mrr) against the "
            "reward (reward@1)."
        )
    lines += power_lines(s, metrics)
    n_tests = len(s)
    lines.append(
        f"({n_tests} variant x metric comparisons at 95%: expect about {0.05 * n_tests:.0f} "
        "'significant' by chance; trust effects that are large or consistent across metrics.)"
    )
    return lines


def _reference_line(s: pd.DataFrame, reference: str, metrics: Sequence[str]) -> str:
    ref = s[s["variant"] == reference].set_index("metric")
    parts = [
        f"{m} {ref.loc[m, 'mean']:.3f} vs SFT {ref.loc[m, 'sft']:.3f}: "
        f"{_fmt_diff(ref.loc[m, 'diff'], ref.loc[m, 'diff_low'], ref.loc[m, 'diff_high'])} "
        f"({ref.loc[m, 'verdict']})"
        for m in metrics
        if m in ref.index
    ]
    return f"\nThe reference '{reference}' vs SFT: " + "; ".join(parts) + "."


def _metric_lines(sm: pd.DataFrame, m: str, reference: str | None) -> list[str]:
    """One metric's verdicts: significantly better/worse than SFT (and than ``reference``), and the best mean."""
    lines = [f"\n{m}:"]
    for label, verdict in (("better than SFT", "better"), ("worse than SFT", "worse")):
        hit = sm[sm["verdict"] == verdict].sort_values("diff", ascending=verdict == "worse")
        items = ", ".join(f"{r.variant} {_fmt_diff(r.diff, r.diff_low, r.diff_high)}" for r in hit.itertuples())
        lines.append(f"  significantly {label}: {items or 'none'}")
    if reference is not None and "vs_ref_verdict" in sm.columns:
        for label, verdict in (("better", "better"), ("worse", "worse")):
            hit = sm[sm["vs_ref_verdict"] == verdict].sort_values("vs_ref", ascending=verdict == "worse")
            items = ", ".join(
                f"{r.variant} {_fmt_diff(r.vs_ref, r.vs_ref_low, r.vs_ref_high)}" for r in hit.itertuples()
            )
            lines.append(f"  significantly {label} than '{reference}': {items or 'none'}")
    d = METRIC_DIRECTION[m]
    top = sm.sort_values("diff", ascending=d < 0).iloc[0]
    lines.append(
        f"  best mean: {top.variant} ({top['mean']:.3f}, vs SFT "
        f"{_fmt_diff(top['diff'], top.diff_low, top.diff_high)}, {top.verdict})"
    )
    return lines


def _world_lines(summary: pd.DataFrame, world: str, metrics: Sequence[str]) -> list[str]:
    """Where the swept variants help or hurt across the grid's worlds (none when it has one world)."""
    others = [w for w in summary["world"].unique() if w != world]
    if not others:
        return []
    swept = list(dict.fromkeys(summary[summary["world"].isin(others)]["variant"]))
    lines = [f"\nAcross worlds (difference to each world's own SFT) for {', '.join(swept)}:"]
    sw = summary[summary["metric"].isin(metrics) & summary["variant"].isin(swept)]
    for w in [world, *others]:
        for v, grp in sw[sw["world"] == w].groupby("variant", sort=False):
            parts = [f"{r.metric} {_fmt_diff(r.diff, r.diff_low, r.diff_high)} {r.verdict}" for r in grp.itertuples()]
            lines.append(f"  {w} / {v}: " + "; ".join(parts))
    return lines


# A CI counts as "too wide to tell" when its minimum detectable effect exceeds this share of the SFT level: on acc@1
# ~0.36 that is ~0.018, about the gains the switches of an ablation grid are expected to make.
WIDE_MDE_REL = 0.05


def power_lines(summary: pd.DataFrame, metrics: Sequence[str]) -> list[str]:
    """Per metric: the minimum detectable effect (median over variants) at this test size and seed count, with a
    warning when it is too wide to tell the effects an ablation looks for from noise."""
    if "mde" not in summary.columns:
        return []
    out = []
    for m in metrics:
        sm = summary[summary["metric"] == m]
        if sm.empty or sm["mde"].isna().all():
            continue
        mde = float(sm["mde"].median())
        nq = int(sm["n_queries"].max()) if "n_queries" in sm.columns else 0
        design = (
            f"{nq} test queries x {int(sm['n_seeds'].min())}+ seeds" if nq else f"{int(sm['n_seeds'].min())}+ seeds"
        )
        if not mde > 0:  # zero-width CIs (e.g. a smoke grid whose variants never moved): no power to report
            out.append(
                f"Power: {m} not measurable: too few test queries to detect any effect ({design}: every "
                "difference's CI has zero width)."
            )
            continue
        # 3 decimals, or 2 significant digits for an MDE under 0.01 (never "~0.000")
        line = (
            f"Power: {m} differences smaller than ~{mde:.3f}"
            if mde >= 0.01
            else f"Power: {m} differences smaller than ~{mde:.2g}"
        ) + f" go undetected (80% power at 5%; {design})"
        sft = float(sm["sft"].abs().median())
        if sft > 0 and mde > WIDE_MDE_REL * sft:
            line += f" -- too wide to tell effects under {mde / sft:.0%} of SFT's {sft:.3g}: " + _more_power(
                summary.attrs.get("test_frac")
            )
        out.append(line + ".")
    return out


def _more_power(test_frac: float | None) -> str:
    """What narrows the intervals of *this* design: a larger test split only while it is still small (the grid's
    ``data.test_frac``, when the summary knows it), else more seeds or more labelled queries."""
    if test_frac is None:
        return "raise data.test_frac (e.g. --set data.test_frac=0.3) or the seeds"
    if test_frac < 0.3:
        return f"raise data.test_frac (now {test_frac:g}; e.g. --set data.test_frac=0.3) or the seeds"
    return (
        f"data.test_frac is already {test_frac:g}: add seeds for the seed part of the noise, or more labelled "
        "queries for the test part"
    )


def summary_table(
    summary: pd.DataFrame, metrics: Sequence[str] = SUMMARY_METRICS, world: str | None = None
) -> pd.DataFrame:
    """Per (world, variant) and metric: "mean difference-to-SFT [95% CI] verdict" cells, for a notebook to display
    as a rendered table (:func:`format_summary` is its text form). Metrics absent from ``summary`` are left out."""
    s = summary[summary["metric"].isin(metrics)]
    if world is not None:
        s = s[s["world"] == world]
    cells = s.assign(
        cell=[
            f"{r['mean']:.3f} {_fmt_diff(r['diff'], r['diff_low'], r['diff_high'])} {r['verdict']}"
            for _, r in s.iterrows()
        ]
    )
    table = cells.pivot_table(index=["world", "variant"], columns="metric", values="cell", aggfunc="first", sort=False)
    return table[[m for m in metrics if m in table.columns]]


def format_summary(summary: pd.DataFrame, metrics: Sequence[str] = SUMMARY_METRICS, world: str | None = None) -> str:
    """A compact text table: per variant and metric, mean and the difference to SFT with its CI and verdict, then
    the minimum detectable effect per metric (:func:`power_lines`). Metrics absent from ``summary`` are left out."""
    s = summary[summary["metric"].isin(metrics)]
    if world is not None:
        s = s[s["world"] == world]
    table = summary_table(summary, metrics, world)
    with pd.option_context("display.width", 250, "display.max_colwidth", 60, "display.max_rows", 500):
        text = "mean, difference to SFT [95% CI], verdict\n" + table.to_string()
    power = power_lines(s, [m for m in metrics if m in table.columns])
    return text + ("\n" + "\n".join(power) if power else "")
