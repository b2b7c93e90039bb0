"""The confirm phase of ``v3kit investigate``: the search's finalists, the SFT you have, the run and every
shippable reference, retrained with fresh seeds and compared on the **test** split that the search never saw.

The verdict's numbers come from here only. Every comparison is a paired two-level bootstrap (seeds x test queries)
of each run's shipped model against the run's SFT; the shippable candidates' comparisons with SFT form one family
whose p-values are corrected with Holm's step-down method, so "better" means better after the correction.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
import yaml

from ..ablate.grid import GridSpec, parse_grid
from ..ablate.stats import bootstrap_p_value, compare, holm, min_detectable_effect, paired_values
from ..train.metrics import METRIC_DIRECTION
from .remedies import RUN
from .search import SearchResult
from .verdict_report import SFT_ONLY

CONFIRM_SEED0 = 100  # fresh seeds: the search trained every trial with seed 0
SFT_RETRAINED = "sft_retrained"
RAW_COSINE = "raw_cosine"
SHIPPED = "selected"  # the model a run ships (``select``), see v3kit/train/selection.py
ALPHA = 0.05
NO_RL = ("rce.epochs=0", "grpo.epochs=0")


@dataclass
class Candidate:
    name: str
    overrides: list[str]
    kind: str  # finalist | reference
    what: str
    shippable: bool = True  # in the family weighed against SFT (and so in Holm's correction)
    retrain_sft: bool = False  # trains its own SFT with each seed
    search_val: float | None = None  # a finalist's val score in the search (one seed)

    @property
    def own_sft(self) -> bool:
        """Trains its own SFT (a forced retrain, or a change of ``sft.*`` / ``model.*``)."""
        return self.retrain_sft or any(o.startswith(("sft.", "model.")) for o in self.overrides)


def references(own_sft: bool, can_residual: bool) -> list[Candidate]:
    """The run, the SFT you have, the run's SFT retrained with each seed (when the run trained it: its seed noise),
    and the raw-feature cosine as a config (the residual model at init, no training; equal query/candidate dims)."""
    out = [
        Candidate(RUN, [], "reference", "the run as it was"),
        Candidate(SFT_ONLY, list(NO_RL), "reference", "the SFT model you have", shippable=False),
    ]
    if own_sft:
        out.append(
            Candidate(
                SFT_RETRAINED, list(NO_RL), "reference", "the run's SFT retrained per seed", False, retrain_sft=True
            )
        )
    if can_residual:
        # the cosine's scores lie in [-1, 1]: a small temperature keeps its policy from being near uniform
        raw = [
            "model.residual=true",
            "model.residual_kind=linear",
            "model.sim_temperature=0.05",
            "sft.epochs=0",
            *NO_RL,
        ]
        out.append(Candidate(RAW_COSINE, raw, "reference", "the raw-feature cosine (residual model at init)"))
    return out


def changes(overrides: Sequence[str], base: dict[str, Any]) -> str:
    """The overrides that differ from the run's config ``base`` (flattened), floats to 3 significant digits: what a
    finalist changes, in a table cell."""
    out = []
    for o in overrides:
        key, _, text = o.partition("=")
        if key.startswith("select"):
            continue
        value = yaml.safe_load(text)
        if key in base and base[key] == value:
            continue
        shown = f"{value:.3g}" if isinstance(value, float) else text
        out.append(f"{key}={shown}")
    return " ".join(out) or "the run's settings"


def finalist_candidates(
    trials: Sequence[dict[str, Any]],
    taken: set[str],
    whys: dict[str, str] | None = None,
    base: dict[str, Any] | None = None,
) -> list[Candidate]:
    """The search's finalists as confirm candidates (``whys``: what an enqueued variant tests, by name; ``base``:
    the run's flattened config, so a sampled trial is described by what it changes)."""
    out = []
    for t in trials:
        name = t["name"] if t["name"] not in taken else f"{t['name']}_best_val"
        taken.add(name)
        what = (whys or {}).get(t["name"]) or changes(t["overrides"], base or {})
        out.append(
            Candidate(name, list(t["overrides"]), "finalist", what, retrain_sft=t["own_sft"], search_val=t["value"])
        )
    return out


def confirm_spec(
    name: str, base: Sequence[str], sft: str, split_seed: int, cands: Sequence[Candidate], seeds: Sequence[int]
) -> GridSpec:
    raw = {
        "name": name,
        "base": list(base),
        "seeds": list(seeds),
        "sft_seed": split_seed,
        "reference": RUN,
        "sft_checkpoint": sft,
        "variants": {c.name: c.overrides for c in cands},
    }
    spec = parse_grid(raw, name=name)
    return dataclasses.replace(spec, sft_per_seed=True, retrain_sft=[c.name for c in cands if c.retrain_sft])


def _kept_sft(frame: pd.DataFrame, name: str) -> tuple[int, int]:
    """(seeds whose shipped model was their SFT, seeds) of ``name``."""
    rows = frame[(frame["variant"] == name) & (frame["split"] == "test") & (frame["stage"] == SHIPPED)]
    rows = rows.drop_duplicates("seed")
    if "selected_stage" not in rows.columns:
        return 0, len(rows)
    return int((rows["selected_stage"] == "sft").sum()), len(rows)


def weigh(
    frame: pd.DataFrame, pq: pd.DataFrame, metric: str, cands: Sequence[Candidate], n_boot: int = 1000
) -> pd.DataFrame:
    """One row per candidate: its mean test ``metric``, the paired effect vs SFT with its 95% interval, the
    bootstrap p-value and its Holm adjustment over the shippable candidates, the verdict after the correction,
    the seeds that kept SFT, the minimum detectable effect and the per-seed effects."""
    d = METRIC_DIRECTION[metric]
    others = [c for c in cands if c.name != SFT_ONLY]
    vs = compare(
        frame, pq, {c.name: (c.name, SFT_ONLY) for c in others}, metrics=[metric], stage=SHIPPED, n_boot=n_boot
    )
    vs = vs.set_index("a")
    final = frame[(frame["split"] == "test") & (frame["stage"] == SHIPPED)]
    means = final.groupby("variant")[metric].mean()
    rows = []
    for c in cands:
        row: dict[str, Any] = {"variant": c.name, "kind": c.kind, "what": c.what, "shippable": c.shippable}
        kept, n = _kept_sft(frame, c.name)
        row.update(seeds=n, kept_sft=kept, search_val=c.search_val, own_sft=c.own_sft)
        row[metric] = float(means.get(c.name, math.nan))
        if c.name == SFT_ONLY or c.name not in vs.index:
            row.update(vs_sft=0.0, vs_sft_low=0.0, vs_sft_high=0.0, p=math.nan, seed_effects=[])
        else:
            vals = paired_values(frame, pq, c.name, SFT_ONLY, metric, stage=SHIPPED)
            per_seed = vals.mean(axis=1) if vals.ndim == 2 else vals
            r = vs.loc[c.name]
            row.update(vs_sft=float(r["diff"]), vs_sft_low=float(r["low"]), vs_sft_high=float(r["high"]))
            row.update(p=bootstrap_p_value(vals, n_boot=n_boot), seed_effects=[float(x) for x in per_seed])
        row["mde"] = min_detectable_effect(row["vs_sft_low"], row["vs_sft_high"])
        rows.append(row)
    table = pd.DataFrame(rows)
    family = table["shippable"] & table["p"].notna()
    table["p_holm"] = math.nan
    table.loc[family, "p_holm"] = holm(table.loc[family, "p"].to_numpy())
    p_used = table["p_holm"].where(family, table["p"])
    sign = np.sign(table["vs_sft"] * d)
    table["verdict"] = np.where(
        p_used < ALPHA, np.where(sign > 0, "better", np.where(sign < 0, "worse", "n.s.")), "n.s."
    )
    table.loc[table["variant"] == SFT_ONLY, "verdict"] = ""
    return table


def choose(table: pd.DataFrame, metric: str) -> str | None:
    """The shippable candidate to recommend: the best mean effect among those better than SFT after Holm's
    correction; None (keep SFT) when there is none."""
    good = table[table["shippable"] & (table["verdict"] == "better")]
    if good.empty:
        return None
    return str(good.loc[(good["vs_sft"] * METRIC_DIRECTION[metric]).idxmax(), "variant"])


def source_of_gain(frame: pd.DataFrame, name: str, own_sft: bool) -> str:
    """Where a candidate's shipped models come from: the stage most of its seeds shipped."""
    rows = frame[(frame["variant"] == name) & (frame["split"] == "test") & (frame["stage"] == SHIPPED)]
    stages = rows.drop_duplicates("seed").get("selected_stage", pd.Series(dtype=str)).value_counts()
    stage = str(stages.index[0]) if len(stages) else "sft"
    if stage == "sft":
        return "the gain comes from the SFT model itself (its scoring head and training)" if own_sft else ""
    rl = "the RCE warm-up" if stage == "rce" else "GRPO"
    if own_sft:  # a candidate with its own SFT changed the model too: the RL stage is not the whole story
        return f"the gain comes from its own SFT model (its scoring head and training), with {rl} on top of it"
    return f"the gain comes from {rl}"


def rl_line(table: pd.DataFrame, metric: str, skip: str = "") -> str:
    """How the RL stages fared: the best finalist that starts from the SFT you have (so only RCE or GRPO can move
    it); empty when there is none, or when it is ``skip`` (already named)."""
    d = METRIC_DIRECTION[metric]
    rl = table[(table["kind"] == "finalist") & ~table["own_sft"].astype(bool)]
    if rl.empty:
        return ""
    r = rl.loc[(rl["vs_sft"] * d).idxmax()]
    if r["variant"] == skip:
        return ""
    effect = f"{r['vs_sft']:+.3f} [{r['vs_sft_low']:+.3f}, {r['vs_sft_high']:+.3f}]"
    if r["seeds"] and r["kept_sft"] == r["seeds"]:
        effect = f"kept SFT in {r['kept_sft']} of {r['seeds']} seeds"
    if r["verdict"] == "better":
        return f"the RL stages help on this data: their best variant ({r['variant']}): {effect}"
    return (
        f"the RL stages do not beat SFT on this data after the correction: their best variant ({r['variant']}): "
        f"{effect}"
    )


def causes_from_search(findings: Sequence[Any], variants: Sequence[Any], result: SearchResult, d: int):
    """Each flagged check with its best switch's val score in the search (one seed; a pruned trial's best before
    it was stopped) minus the run's there: a ranking of the causes, not a verdict (that is the confirm phase's).
    A variant that shared another's trial (``result.aliases``: it trains the same config) reads that score."""
    val = {t["name"]: t["best"] for t in result.trials if t.get("best") is not None}
    for alias, name in result.aliases.items():
        if name in val:
            val.setdefault(alias, val[name])
    run_val = val.get(RUN)
    out = []
    for f in findings:
        if not f.triggered:
            continue
        tested = [(v.name, val[v.name]) for v in variants if v.check == f.check and v.name in val]
        top = max(tested, key=lambda e: d * e[1]) if tested else None
        effect = None if top is None or run_val is None else top[1] - run_val
        out.append({"check": f.check, "remedy": top[0] if top else None, "val_vs_run": effect, "message": f.message})
    out.sort(key=lambda c: -d * c["val_vs_run"] if c["val_vs_run"] is not None else math.inf)
    return out


def below_reference(
    table: pd.DataFrame, best: str, references: dict[str, float], metric: str, raw_is_candidate: bool
) -> list[str]:
    """A note for each reference ranker the verdict lists whose test mean is above the recommendation's, and why
    the recommendation stands all the same."""
    d = METRIC_DIRECTION[metric]
    mine = float(table.set_index("variant").loc[best, metric])
    notes = []
    for name, value in references.items():
        if name == "reward_oracle" or d * (value - mine) <= 0:
            continue  # the reward's argmax reads the reward at test time: not a ranker anyone can ship
        why = (
            "that ranker was a confirm candidate (raw_cosine) and did not beat SFT after the correction"
            if name == "raw_cosine" and raw_is_candidate
            else "it is not a configuration the kit can ship for this model"
        )
        notes.append(f"the recommendation ({mine:.4f}) is below the reference ranker {name} ({value:.4f}); {why}")
    return notes


def importances(study: Any) -> dict[str, float]:
    """Optuna's parameter importances of the search (empty when too few trials finished to rank them)."""
    try:
        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "few trials in a regime": the figure and the table say how many ran
            return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()} if study else {}
    except Exception:  # fewer than two finished trials, or one value for all: nothing to rank
        return {}


def prediction_interval(effect: Sequence[float], seed_effects: Sequence[float], k: int) -> tuple[float, float]:
    """Where the mean effect of ``k`` fresh seeds should fall (95%): the verdict's interval ``effect`` = [mean,
    lo, hi] widened by the seeds' own spread, ``mean +- 1.96 sqrt(se^2 + sd^2 / k)`` (se read off the interval,
    sd the standard deviation of the confirm phase's per-seed effects). For keep-SFT of an SFT the run trained,
    sd is the SFT's seed noise, so a correct keep-SFT verdict passes; an imported SFT's keep-SFT is exactly 0."""
    mean, lo, hi = (float(x) for x in effect)
    se = (hi - lo) / (2 * 1.96)
    sd = float(np.std(seed_effects, ddof=1)) if len(seed_effects) > 1 else 0.0
    half = 1.96 * math.sqrt(se**2 + sd**2 / max(1, k))
    return min(lo, mean - half), max(hi, mean + half)


def power_line(n_test: int, test_frac: float, seeds: int, metric: str, mdes: Sequence[float] = ()) -> str:
    """The design's power, in words: where the per-finalist minimum detectable effects are, and what narrows them.
    ``mdes``: the finalists' minimum detectable effects; none positive and finite means no run differed from
    another (a smoke run), so there is no power to state."""
    if any(m > 0 and math.isfinite(m) for m in mdes) or not mdes:
        line = (
            f"With {n_test} test queries (data.test_frac={test_frac:g}) and {seeds} seeds, each candidate's minimum "
            f"detectable {metric} effect (80% power at 5%) is in the table's mde column"
        )
    else:
        line = (
            f"With {n_test} test queries (data.test_frac={test_frac:g}) and {seeds} seeds: too few test queries to "
            f"detect any effect ({metric} did not differ between runs, so every interval has zero width)"
        )
    if test_frac < 0.3:
        line += f"; a larger test split (e.g. data.test_frac={min(0.4, 2 * test_frac):g}) narrows the intervals"
    else:
        line += "; the test split is already large: more labelled queries, or more seeds, narrow the intervals"
    return line + "."
