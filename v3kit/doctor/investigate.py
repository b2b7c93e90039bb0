"""``v3kit investigate RUN_DIR``: from a finished run to a verdict, what to ship.

The doctor names suspects; this module tests them. It builds a grid against the run itself (the run as it was,
SFT alone, RCE alone, each flagged switch alone, and combinations of the remedies that are meant to be shipped),
runs it with sequential seeds (a first round of ``initial_seeds``, then more seeds for the variants whose interval
against the leader still straddles 0, while the budget lasts), and writes ``verdict.md`` and ``verdict.json``.

Every comparison is a paired two-level bootstrap (seeds x test queries) of the *shipped* model of each run (the
``selected`` row: the last stage, or the best val epoch for the variants that select) on the run's own test split.
A variant is recommended only when its interval against SFT on the chosen metric excludes 0 in the good direction;
otherwise the verdict is to keep SFT, and it says why.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..ablate.cli import MAX_WORKERS, add_backend_args
from ..ablate.grid import BASE_WORLD, GridSpec, parse_grid
from ..ablate.runner import collect, run_grid
from ..ablate.stats import compare, min_detectable_effect
from ..bounds import cli_number
from ..config import ConfigError, dump_config, load_config
from ..data.debias import recurring_share
from ..pipeline import prepare_data, recorded_sft_checkpoint, recorded_split_seed, run_pipeline
from ..run import Run, split_seed
from ..run_info import config_edits
from ..rundir import atomic_write_text, json_text
from ..train.baselines import baseline_table
from ..train.checkpoint import load_checkpoint, model_from_checkpoint
from ..train.metrics import METRIC_DIRECTION, evaluate
from ..train.model import DEFAULT_TARGET
from .grid import run_overrides
from .remedies import RUN, Variant, build_variants, decide, moving_lr  # noqa: F401 - moving_lr: documented
from .report import diagnose
from .verdict_report import SFT_ONLY, VERDICT_JSON, VERDICT_MD, Verdict, verdict_markdown, write_verdict

RECOMMENDED = "recommended.yaml"
RECOMMENDATIONS = ("keep_sft", "rce_only", "variant")
# Stage of a run that is compared: the model it ships (``select``), see v3kit/train/selection.py.
SHIPPED = "selected"


def _is_rce_only(v: Variant, spec: GridSpec) -> bool:
    return spec.value(v.name, "grpo.epochs") == 0 and spec.value(v.name, "rce.epochs") > 0


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _triple(row: pd.Series | None) -> list[float]:
    if row is None:
        return [0.0, 0.0, 0.0]
    return [float(row["diff"]), float(row["low"]), float(row["high"])]


class Investigation:
    """One investigation's grid, its sequential seeds and its verdict (resumable: the run dirs are the ledger)."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        metric: str = "acc@1",
        out: str | Path | None = None,
        budget_minutes: float = 30.0,
        workers: int = 1,
        initial_seeds: int = 3,
        max_seeds: int = 8,
        seed_step: int = 2,
        progress: bool = True,
        smoke: Sequence[str] = (),
        only: Sequence[str] | None = None,
        backend: str = "local",
        address: str | None = None,
    ) -> None:

        self.run_dir = Path(run_dir)
        cfg_path = self.run_dir / "config.yaml"
        if not cfg_path.is_file():
            raise ConfigError(f"{cfg_path} not found: investigate needs a finished run dir (written by v3kit run)")
        if METRIC_DIRECTION.get(metric, 0) == 0:
            raise ConfigError(
                f"--metric must be one of {[m for m, d in METRIC_DIRECTION.items() if d]}, got {metric!r}"
            )
        if initial_seeds < 2:
            raise ConfigError(f"--initial-seeds must be >= 2 (an interval needs two runs), got {initial_seeds}")
        if not (math.isfinite(budget_minutes) and budget_minutes >= 0):  # nan would never stop, -5 never start
            raise ConfigError(f"--budget-minutes must be a finite number >= 0, got {budget_minutes}")
        self.metric, self.budget_s, self.workers, self.progress = metric, budget_minutes * 60, workers, progress
        self.backend, self.address = backend, address
        self.initial_seeds, self.max_seeds, self.seed_step = initial_seeds, max(max_seeds, initial_seeds), seed_step
        self.cfg = load_config(cfg_path)
        edits = config_edits(self.run_dir, self.cfg)
        if edits:  # the verdict would compare variants of a config the run never trained
            raise ConfigError(
                f"{cfg_path} was edited after the run ({edits}); investigate tests variants of the run as it "
                f"trained: restore those values (the run recorded them in {self.run_dir / 'run_info.json'}), or "
                "train the edited config with v3kit run and investigate that run"
            )
        self.out = Path(out) if out is not None else self.run_dir / "investigate"
        sft = recorded_sft_checkpoint(self.run_dir) or self.run_dir / "sft.pt"
        if not Path(sft).is_file():
            raise ConfigError(f"the run's SFT checkpoint {sft} is missing: investigate compares every variant with it")
        self.sft = Path(sft).resolve()
        self.sft_is_own = self.sft == (self.run_dir / "sft.pt").resolve()  # trained by the run, not imported
        self.split_seed = recorded_split_seed(self.run_dir)
        if self.split_seed is None:
            self.split_seed = split_seed(self.cfg)

        split_cfg = dataclasses.replace(self.cfg, seed=self.split_seed)
        self.splits = Run(split_cfg, warn=False).splits  # the split the run trained on, resolved as a run does
        self.findings = diagnose(self.run_dir, splits=self.splits)  # the same split the doctor would rebuild
        if metric == "utility@1" and self.splits.test.utility is None:
            raise ConfigError(
                "--metric utility@1 needs a true utility (the synthetic world); this data has none: use acc@1 or mrr"
            )

        can_prior = recurring_share(self.splits.train) > 0
        can_residual = (
            self.cfg.model.target == DEFAULT_TARGET and self.splits.train.query_dim == self.splits.train.cand_dim
        )
        self.variants = build_variants(self.cfg, self.findings, metric, can_prior=can_prior, can_residual=can_residual)
        if only is not None:  # a quick look: these variants (and the two references) only
            unknown = sorted(set(only) - {v.name for v in self.variants})
            if unknown:
                raise ConfigError(
                    f"--only names {unknown}, which this investigation does not build; it has "
                    f"{[v.name for v in self.variants]}"
                )
            self.variants = [v for v in self.variants if v.name in {*only, RUN, SFT_ONLY}]
        base = [o for o in run_overrides(self.cfg) if not o.startswith(("data.split_seed=", "sft.checkpoint="))]
        base += [f"data.split_seed={self.split_seed}", *smoke]
        raw = {
            "name": f"investigate_{self.run_dir.name}",
            "base": base,
            "seeds": [0, 1],
            "sft_seed": self.split_seed,
            "reference": RUN,
            "sft_checkpoint": str(self.sft),
            "variants": {v.name: v.overrides for v in self.variants},
        }
        self.spec = parse_grid(raw, name=raw["name"])
        self.seeds: dict[str, list[int]] = {}
        self.wall_s = 0.0

    # ------------------------------------------------------------------------------------------------ running
    def _run(self, variants: Sequence[str], seeds: Sequence[int]) -> None:
        for v in variants:
            self.seeds.setdefault(v, [])
            self.seeds[v] = sorted(set(self.seeds[v]) | set(seeds))
        sub = dataclasses.replace(
            self.spec,
            variants={v: self.spec.variants[v] for v in variants},
            seeds=list(seeds),
            reference=None,
            questions={},
        )
        run_grid(
            sub, self.out, workers=self.workers, progress=self.progress, backend=self.backend, address=self.address
        )

    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        seeds = sorted({s for ss in self.seeds.values() for s in ss})
        full = dataclasses.replace(self.spec, seeds=seeds)
        return collect(self.out, full, worlds=[BASE_WORLD], return_per_query=True)

    def _compare(self, frame: pd.DataFrame, pq: pd.DataFrame, pairs: dict[str, tuple[str, str]]) -> pd.DataFrame:
        return compare(frame, pq, pairs, metrics=[self.metric], stage=SHIPPED, n_boot=1000)

    def _candidates(self) -> list[str]:
        return [v.name for v in self.variants if v.name != SFT_ONLY]

    def leader_and_open(self, frame: pd.DataFrame, pq: pd.DataFrame) -> tuple[str, list[str]]:
        """The candidate with the best mean effect vs SFT, and the variants still undecided: those whose interval
        against the leader straddles 0, and the leader itself while its interval against SFT does."""
        d = METRIC_DIRECTION[self.metric]
        vs_sft = self._compare(frame, pq, {v: (v, SFT_ONLY) for v in self._candidates()}).set_index("a")
        leader = str((vs_sft["diff"] * d).idxmax())
        open_ = []
        if vs_sft.loc[leader, "verdict"] == "n.s.":
            open_.append(leader)
        others = [v for v in self._candidates() if v != leader]
        vs_lead = self._compare(frame, pq, {v: (v, leader) for v in others})
        open_ += [r.a for r in vs_lead.itertuples() if r.verdict == "n.s."]
        return leader, open_

    def run(self) -> "Verdict":
        t0 = time.perf_counter()
        names = [v.name for v in self.variants]
        seeds = list(range(self.initial_seeds))
        self._run(names, seeds)
        per_round = time.perf_counter() - t0
        while True:
            frame, pq = self.frames()
            leader, open_ = self.leader_and_open(frame, pq)
            n_now = len(self.seeds[leader])
            if not open_ or n_now >= self.max_seeds:
                break
            new = list(range(n_now, min(n_now + self.seed_step, self.max_seeds)))
            todo = list(dict.fromkeys([*open_, leader, SFT_ONLY, RUN]))
            elapsed = time.perf_counter() - t0
            # a round's cost grows with its runs: scale the first round's wall time by the share of runs
            est = per_round * len(todo) * len(new) / (len(names) * len(seeds))
            if elapsed + est > self.budget_s:
                break
            self._run(todo, new)
        self.wall_s = time.perf_counter() - t0
        return self.verdict()

    # ------------------------------------------------------------------------------------------------ verdict
    def verdict(self) -> Verdict:
        frame, pq = self.frames()
        d = METRIC_DIRECTION[self.metric]
        cands = self._candidates()
        vs_sft = self._compare(frame, pq, {v: (v, SFT_ONLY) for v in cands}).set_index("a")
        vs_run = self._compare(frame, pq, {v: (v, RUN) for v in cands if v != RUN}).set_index("a")
        final = frame[(frame["split"] == "test") & (frame["stage"] == SHIPPED)]
        means = final.groupby("variant")[self.metric].mean()
        nseeds = final.groupby("variant")["seed"].nunique()
        kinds = {v.name: v for v in self.variants}
        best = decide(vs_sft, self.metric)
        if best is not None:
            rec = "rce_only" if _is_rce_only(kinds[best], self.spec) else "variant"
            r = vs_sft.loc[best]
            why = (
                f"{best} ({kinds[best].why}) beats SFT on {self.metric} by {r['diff']:+.4f} "
                f"[{r['low']:+.4f}, {r['high']:+.4f}] (95% interval over seeds x test queries excludes 0)"
            )
        else:
            best, rec = SFT_ONLY, "keep_sft"
            top = str((vs_sft["diff"] * d).idxmax())
            r = vs_sft.loc[top]
            why = (
                f"no variant's interval against SFT on {self.metric} excludes 0 from below; the best mean was "
                f"{top} ({kinds[top].why}) at {r['diff']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]: keep SFT"
            )
        run_row = None if best == RUN else (vs_run.loc[best] if best in vs_run.index else None)
        if best == SFT_ONLY:  # keep_sft vs the run: SFT minus the run
            back = self._compare(frame, pq, {SFT_ONLY: (SFT_ONLY, RUN)}).iloc[0]
            eff_run = [float(back["diff"]), float(back["low"]), float(back["high"])]
        else:
            eff_run = _triple(run_row)
        eff_sft = [0.0, 0.0, 0.0] if best == SFT_ONLY else _triple(vs_sft.loc[best])
        config_path = self.write_config(best)
        causes = []
        for f in self.findings:
            if not f.triggered:
                continue
            tested = [v for v in self.variants if v.check == f.check]
            effects = [(v.name, _triple(vs_run.loc[v.name])) for v in tested if v.name in vs_run.index]
            top = max(effects, key=lambda e: d * e[1][0]) if effects else None
            causes.append(
                {
                    "check": f.check,
                    "remedy": top[0] if top else None,
                    "effect_vs_run": top[1] if top else None,
                    "message": f.message,
                }
            )
        causes.sort(key=lambda c: -d * c["effect_vs_run"][0] if c["effect_vs_run"] else math.inf)
        table = pd.DataFrame(
            [
                {
                    "variant": v.name,
                    "kind": v.kind,
                    "what": v.why,
                    "seeds": int(nseeds.get(v.name, 0)),
                    self.metric: float(means.get(v.name, math.nan)),
                    "vs_sft": float(vs_sft.loc[v.name, "diff"]) if v.name in vs_sft.index else 0.0,
                    "vs_sft_low": float(vs_sft.loc[v.name, "low"]) if v.name in vs_sft.index else 0.0,
                    "vs_sft_high": float(vs_sft.loc[v.name, "high"]) if v.name in vs_sft.index else 0.0,
                    "verdict": str(vs_sft.loc[v.name, "verdict"]) if v.name in vs_sft.index else "",
                }
                for v in self.variants
            ]
        )

        refs = baseline_table(self.splits.test)
        references = {str(k): float(v) for k, v in refs[self.metric].items()} if self.metric in refs else {}
        mde = (
            min_detectable_effect(eff_sft[1], eff_sft[2])
            if best != SFT_ONLY
            else min_detectable_effect(
                float(vs_sft.loc[vs_sft.index[0], "low"]), float(vs_sft.loc[vs_sft.index[0], "high"])
            )
        )
        power = self._power_line(mde)
        runs = int(final[["variant", "seed"]].drop_duplicates().shape[0])
        self.run_seconds = (
            float(final.drop_duplicates(["variant", "seed"])["wall_s"].sum()) if "wall_s" in final.columns else 0.0
        )
        return Verdict(
            self.metric,
            rec,
            best,
            str(config_path),
            eff_sft,
            eff_run,
            causes,
            why,
            table,
            references,
            runs,
            self.wall_s,
            power,
            str(self.sft),
            self.run_seconds,
        )

    def _power_line(self, mde: float) -> str:
        n_test = len(self.splits.test)
        frac = self.cfg.data.test_frac
        line = (
            f"With {n_test} test queries (data.test_frac={frac:g}) and up to {self.max_seeds} seeds, "
            f"{self.metric} effects smaller than ~{_fmt(mde)} go undetected (80% power at 5%)"
        )
        if not (mde > 0 and math.isfinite(mde)):  # no run differed from another (a smoke run): no power to state
            line = (
                f"With {n_test} test queries (data.test_frac={frac:g}) and up to {self.max_seeds} seeds: too few "
                f"test queries to detect any effect ({self.metric} did not differ between runs, so every interval "
                "has zero width)"
            )
        if frac < 0.3:
            line += f"; a larger test split (e.g. data.test_frac={min(0.4, 2 * frac):g}) narrows the intervals"
        else:
            line += "; the test split is already large: more labelled queries, or more seeds, narrow the intervals"
        return line + "."

    def write_config(self, variant: str) -> Path:
        """The complete YAML of ``variant`` that ``v3kit run --config`` trains as is: the run's data and test split
        (``data.split_seed``), and the run's SFT checkpoint (``sft.checkpoint``) unless the variant trains its own."""
        own_sft = any(o.startswith(("sft.", "model.")) for o in self.spec.variants[variant])
        retrain = own_sft or (variant == SFT_ONLY and self.sft_is_own)
        # keep_sft of a run that trained its SFT itself: the config trains that SFT alone (same seed, same split:
        # the same model); otherwise the config starts from the run's SFT checkpoint, the model you have
        seed = self.cfg.seed if variant == SFT_ONLY else 0
        cfg = self.spec.resolve(BASE_WORLD, variant, seed, self.out / "recommended_run")
        cfg = dataclasses.replace(
            cfg, progress=True, sft=dataclasses.replace(cfg.sft, checkpoint=None if retrain else str(self.sft))
        )
        path = self.out / RECOMMENDED
        self.out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, path)
        return path


def investigate(run_dir: str | Path, **options: Any) -> Verdict:
    """Doctor, grid, sequential seeds and verdict for ``run_dir``; writes ``verdict.md``/``verdict.json`` (plus the
    recommended config and ``effects.png``) to ``out`` (default ``RUN_DIR/investigate``). ``options`` are those of
    :class:`Investigation` (``metric``, ``out``, ``budget_minutes``, ``workers``, ``initial_seeds``, ``max_seeds``,
    ``progress``, ``smoke``: overrides added to every run, ``only``, ``backend``, ``address``)."""
    inv = Investigation(run_dir, **options)
    v = inv.run()
    write_verdict(v, inv.run_dir, inv.out)
    return v


def reproduce(out: str | Path, seeds: Sequence[int], *, progress: bool = False) -> dict[str, Any]:
    """Retrain ``verdict.json``'s config with ``seeds`` and measure its shipped model against the run's SFT on the
    same test split: the check that the verdict's ``effect_vs_sft`` holds for runs it never saw."""

    out = Path(out)
    if not seeds:
        raise ValueError("reproduce needs at least one seed (--reproduce K with K >= 1)")
    v = json.loads((out / VERDICT_JSON).read_text())
    effects = []
    for s in seeds:
        cfg = load_config(
            v["config"], [f"seed={s}", f"run_dir={out / 'reproduce' / f'seed{s}'}", f"progress={str(progress).lower()}"]
        )
        res = run_pipeline(cfg)
        sft_path = Path(cfg.sft.checkpoint) if cfg.sft.checkpoint else None
        splits = prepare_data(cfg)
        if sft_path is None:  # a variant that trains its own SFT is compared with the run's SFT all the same
            sft_path = Path(v["sft"])
        ref = model_from_checkpoint(load_checkpoint(sft_path), sft_path)
        a = evaluate(res.models["selected"], splits.test, temperature=1.0)[v["metric"]]
        b = evaluate(ref, splits.test, temperature=1.0)[v["metric"]]
        effects.append(float(a - b))
    lo, hi = v["effect_vs_sft"][1], v["effect_vs_sft"][2]
    mean = float(np.mean(effects))
    return {"effects": effects, "mean": mean, "interval": [lo, hi], "inside": lo <= mean <= hi}


# ------------------------------------------------------------------------------------------------ CLI
def cmd_investigate(args: argparse.Namespace) -> int:
    inv = Investigation(
        args.run_dir,
        metric=args.metric,
        out=args.out,
        budget_minutes=args.budget_minutes,
        workers=args.workers,
        initial_seeds=args.initial_seeds,
        max_seeds=args.max_seeds,
        progress=not args.no_progress,
        smoke=args.set or [],
        only=args.only.split(",") if args.only else None,
        backend=args.backend,
        address=args.address,
    )
    print(
        f"investigating {inv.run_dir}: {len(inv.variants)} variants, {args.initial_seeds} seeds to start, "
        f"budget {args.budget_minutes:g} min, {args.workers} worker(s) -> {inv.out}"
    )
    v = inv.run()
    write_verdict(v, inv.run_dir, inv.out)
    print(verdict_markdown(v, inv.run_dir, inv.out))
    print(f"wrote {inv.out / VERDICT_MD} and {inv.out / VERDICT_JSON}")
    if args.reproduce is not None:
        seeds = [REPRODUCE_SEED0 + i for i in range(args.reproduce)]
        rep = reproduce(inv.out, seeds, progress=not args.no_progress)
        data = json.loads((inv.out / VERDICT_JSON).read_text())
        data["reproduced"] = {"seeds": seeds, **rep}
        atomic_write_text(inv.out / VERDICT_JSON, json_text(data))
        lo, hi = rep["interval"]
        print(
            f"reproduce: retrained {data['config']} with fresh seeds {seeds}: effect vs the run's SFT "
            f"{', '.join(f'{e:+.4f}' for e in rep['effects'])} (mean {rep['mean']:+.4f}), "
            f"{'inside' if rep['inside'] else 'OUTSIDE'} the verdict's interval [{lo:+.4f}, {hi:+.4f}]"
        )
    return 0


REPRODUCE_SEED0 = 1000  # fresh seeds, never among a grid's (which count from 0)
# Bounds of the numeric options (typo guards): a seed is a full training run, a budget of ~2 years is no budget.
MAX_SEEDS, MAX_BUDGET_MINUTES = 1000, 1e6


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "investigate",
        help="from a finished run to a verdict: test the doctor's remedies "
        "with seeds and intervals, and say what to ship",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--metric",
        default="acc@1",
        help="the metric the verdict is judged by (utility@1 on the synthetic world, which knows the truth)",
    )
    p.add_argument(
        "--budget-minutes",
        type=cli_number(float, 0, MAX_BUDGET_MINUTES),
        default=30.0,
        help="stop adding seeds when this is spent (0: the first round only)",
    )
    p.add_argument(
        "--workers",
        type=cli_number(int, 1, MAX_WORKERS),
        default=1,
        help="parallel worker processes (one torch thread each)",
    )
    p.add_argument("--out", help="output directory (default: RUN_DIR/investigate)")
    p.add_argument(
        "--initial-seeds", type=cli_number(int, 2, MAX_SEEDS), default=3, help="seeds of the first round (>= 2)"
    )
    p.add_argument("--max-seeds", type=cli_number(int, 2, MAX_SEEDS), default=8, help="most seeds any variant gets")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override added to every run of the grid (e.g. fewer epochs for a quick look)",
    )
    add_backend_args(p)
    p.add_argument(
        "--only",
        metavar="V1,V2",
        help="build only these variants (plus 'run' and 'sft_only'), e.g. "
        "rce_moving,rce_grpo_anchored for a quick look",
    )
    p.add_argument(
        "--reproduce",
        type=cli_number(int, 1, MAX_SEEDS),
        default=None,
        metavar="K",
        help="then retrain the recommended config with K fresh seeds and check that its effect vs SFT "
        "falls inside the verdict's interval (recorded in verdict.json)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_investigate)
