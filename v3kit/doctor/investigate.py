"""``v3kit investigate RUN_DIR``: from a finished run to a verdict, what to ship.

The doctor names suspects; this module finds what to ship, in two phases on separate splits:

1. **Search** (:mod:`.search`): an Optuna study over the declared search space (``configs/search_space.yaml``):
   single-seed trials scored on **val**, pruned epoch by epoch. The run, the remedies and each of the doctor's
   flagged switches are its first trials (they rank the search; they no longer gate it). With ``stack='auto'``
   (the default) trials that share a structure train as one stacked model (:mod:`.search_stacked`).
2. **Confirm** (:mod:`.confirm`): the top ``top_k`` configurations, plus the SFT you have, the run and every
   shippable reference (the raw cosine is the residual model at init), retrained with fresh seeds and compared on
   the **test** split the search never saw. The verdict's numbers come from here only; the comparisons with SFT
   are Holm-corrected.

``budget_minutes`` bounds both phases: the search stops when the time left is what the confirm phase needs,
estimated from the trials' measured run times.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..ablate.grid import BASE_WORLD, GridSpec
from ..ablate.runner import collect, run_grid
from ..ablate.stats import compare
from ..config import ConfigError, dump_config, load_config
from ..data.debias import recurring_share
from ..pipeline import prepare_data, recorded_sft_checkpoint, recorded_split_seed, run_pipeline
from ..run import Run, split_seed
from ..run_info import config_edits
from ..train.baselines import baseline_table
from ..train.checkpoint import load_checkpoint, model_from_checkpoint
from ..train.metrics import METRIC_DIRECTION, evaluate
from ..train.model import DEFAULT_TARGET
from .confirm import (
    CONFIRM_SEED0,
    SFT_RETRAINED,
    SHIPPED,
    Candidate,
    below_reference,
    causes_from_search,
    choose,
    confirm_spec,
    finalist_candidates,
    importances,
    power_line,
    prediction_interval,
    references,
    rl_line,
    source_of_gain,
    weigh,
)
from .grid import run_overrides
from .remedies import RUN, Variant, build_variants, decide, moving_lr  # noqa: F401 - decide, moving_lr: documented
from .report import diagnose
from .search import ConfirmPlan, Search, SearchResult, confirm_seconds, finalists
from .search_stacked import StackedSearch, nothing_stacks
from .space import active, load_space, run_values
from .verdict_report import SFT_ONLY, VERDICT_JSON, Verdict, write_verdict

RECOMMENDED = "recommended.yaml"
BUDGET_RESERVE = 0.05  # share of --budget-minutes that neither phase plans to use (see Investigation.run)
RECOMMENDATIONS = ("keep_sft", "rce_only", "variant")


def _triple(row: Any) -> list[float]:
    if row is None:
        return [0.0, 0.0, 0.0]
    return [float(row["diff"]), float(row["low"]), float(row["high"])]


def _check_sizes(confirm_seeds: int, top_k: int, max_trials: int) -> None:
    if confirm_seeds < 2:
        raise ConfigError(f"--confirm-seeds must be >= 2 (an interval needs two runs), got {confirm_seeds}")
    if top_k < 1 or max_trials < 1:
        raise ConfigError(f"--top-k and --trials must be >= 1, got {top_k} and {max_trials}")


def _check_request(
    cfg_path: Path, metric: str, confirm_seeds: int, top_k: int, max_trials: int, budget_minutes: float
) -> None:
    """Refuse a request that cannot run before anything loads: no finished run, an unknown metric, bad sizes."""
    if not cfg_path.is_file():
        raise ConfigError(f"{cfg_path} not found: investigate needs a finished run dir (written by v3kit run)")
    if METRIC_DIRECTION.get(metric, 0) == 0:
        raise ConfigError(f"--metric must be one of {[m for m, d in METRIC_DIRECTION.items() if d]}, got {metric!r}")
    _check_sizes(confirm_seeds, top_k, max_trials)
    if not (math.isfinite(budget_minutes) and budget_minutes >= 0):  # nan would never stop, -5 never start
        raise ConfigError(f"--budget-minutes must be a finite number >= 0, got {budget_minutes}")


class Investigation:
    """One investigation: the doctor, the search on val, the confirm phase on test, and the verdict (resumable:
    the study's journal and the confirm phase's run dirs are the ledger)."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        metric: str = "acc@1",
        out: str | Path | None = None,
        budget_minutes: float = 30.0,
        workers: int = 1,
        top_k: int = 3,
        confirm_seeds: int = 3,
        max_trials: int = 200,
        space: str | Path | None = None,
        progress: bool = True,
        smoke: Sequence[str] = (),
        only: Sequence[str] | None = None,
        backend: str = "local",
        address: str | None = None,
        seed: int = 0,
        stack: str = "auto",
    ) -> None:

        self.run_dir = Path(run_dir)
        cfg_path = self.run_dir / "config.yaml"
        _check_request(cfg_path, metric, confirm_seeds, top_k, max_trials, budget_minutes)
        self.metric, self.budget_s, self.workers, self.progress = metric, budget_minutes * 60, workers, progress
        self.backend, self.address, self.seed, self.stack = backend, address, seed, stack
        self.stack_note: str | None = None  # set by search(): why --stack auto found nothing to stack
        self.top_k, self.confirm_seeds, self.max_trials = top_k, confirm_seeds, max_trials
        self.cfg = self._config_as_trained(cfg_path)
        self.out = Path(out) if out is not None else self.run_dir / "investigate"
        self.sft = self._sft_checkpoint()
        self.sft_is_own = self.sft == (self.run_dir / "sft.pt").resolve()  # trained by the run, not imported
        self._rebuild_split(metric)
        self.conditions = {
            "own_sft": self.sft_is_own,
            "builtin_model": self.cfg.model.target == DEFAULT_TARGET,
            "same_dims": self.splits.train.query_dim == self.splits.train.cand_dim,
            "recurring_ids": recurring_share(self.splits.train) > 0,
        }
        self.can_residual = self.conditions["builtin_model"] and self.conditions["same_dims"]
        self.params = active(load_space(space), self.conditions)
        self._build_variants(metric, only)
        base = [o for o in run_overrides(self.cfg) if not o.startswith(("data.split_seed=", "sft.checkpoint="))]
        self.base = [*base, f"data.split_seed={self.split_seed}", *smoke]
        self.spec: GridSpec | None = None
        self.candidates: list[Candidate] = []
        self.search_result: SearchResult | None = None
        self.confirmed: dict[str, int] = {}
        self.wall_s = 0.0

    def _config_as_trained(self, cfg_path: Path) -> Any:
        """The run's config; one edited after the run is refused: the verdict would compare variants of a config
        the run never trained."""
        cfg = load_config(cfg_path)
        edits = config_edits(self.run_dir, cfg)
        if edits:
            raise ConfigError(
                f"{cfg_path} was edited after the run ({edits}); investigate tests variants of the run as it "
                f"trained: restore those values (the run recorded them in {self.run_dir / 'run_info.json'}), or "
                "train the edited config with v3kit run and investigate that run"
            )
        return cfg

    def _sft_checkpoint(self) -> Path:
        """The SFT checkpoint the run started from (resolved), which every variant is compared with."""
        sft = recorded_sft_checkpoint(self.run_dir) or self.run_dir / "sft.pt"
        if not Path(sft).is_file():
            raise ConfigError(f"the run's SFT checkpoint {sft} is missing: investigate compares every variant with it")
        return Path(sft).resolve()

    def _rebuild_split(self, metric: str) -> None:
        """The split the run trained on (resolved as a run does) and the doctor's findings on that same split."""
        self.split_seed = recorded_split_seed(self.run_dir)
        if self.split_seed is None:
            self.split_seed = split_seed(self.cfg)
        self.split_cfg = dataclasses.replace(self.cfg, seed=self.split_seed)
        self.splits = Run(self.split_cfg, warn=False).splits  # the split the run trained on, resolved as a run does
        self.findings = diagnose(self.run_dir, splits=self.splits)  # the same split the doctor would rebuild
        if metric == "utility@1" and self.splits.test.utility is None:
            raise ConfigError(
                "--metric utility@1 needs a true utility (the synthetic world); this data has none: use acc@1 or mrr"
            )

    def _build_variants(self, metric: str, only: Sequence[str] | None) -> None:
        """The variants the search starts from (the run, the remedies, the doctor's switches); ``only``: a quick
        look at these variants (and the two references) as the only trials."""
        self.variants = build_variants(
            self.cfg, self.findings, metric, can_prior=self.conditions["recurring_ids"], can_residual=self.can_residual
        )
        if only is not None:
            unknown = sorted(set(only) - {v.name for v in self.variants})
            if unknown:
                raise ConfigError(
                    f"--only names {unknown}, which this investigation does not build; it has "
                    f"{[v.name for v in self.variants]}"
                )
            self.variants = [v for v in self.variants if v.name in {*only, RUN, SFT_ONLY}]
            self.max_trials = min(self.max_trials, len(self.variants) - 1)

    # ------------------------------------------------------------------------------------------------ running
    def refs(self) -> list[Candidate]:
        return references(self.sft_is_own, self.can_residual)

    def search(self, deadline: float) -> SearchResult:
        """The search phase: the run, the remedies and the doctor's switches first, then TPE, until the trial cap
        or until the time left is what the confirm phase needs; with ``stack='auto'`` the trials run as stacks."""
        search = self._search(StackedSearch if self.stack == "auto" else Search)
        if isinstance(search, StackedSearch):
            self.stack_note = nothing_stacks(search.task())
            if self.stack_note is not None:  # every trial would run alone: the one-at-a-time search's own path
                search = self._search(Search)
                if self.progress:
                    print(f"search: one trial at a time: {self.stack_note}", flush=True)
        search.enqueue([(v.name, v.overrides) for v in self.variants if v.name != SFT_ONLY])
        plan = ConfirmPlan(self.top_k, self.confirm_seeds, self.sft_is_own)
        self.search_result = search.run(deadline, plan, progress=self.progress)
        return self.search_result

    def _search(self, kind: type[Search]) -> Search:
        return kind(
            self.out / "search",
            self.params,
            base=self.base,
            split_cfg=load_config(None, [*self.base, f"seed={self.split_seed}", "progress=false"]),
            sft=self.sft,
            metric=self.metric,
            workers=self.workers,
            backend=self.backend,
            address=self.address,
            max_trials=self.max_trials,
            seed=self.seed,
        )

    def fit_confirm(self, result: SearchResult, deadline: float) -> tuple[int, int]:
        """(finalists, seeds) of the confirm phase that fit the time left, at the trials' measured run times: fewer
        finalists first (down to 1), then fewer seeds (down to 2)."""
        k, n = self.top_k, self.confirm_seeds
        while (k > 1 or n > 2) and confirm_seconds(
            result.trials, self.metric, ConfirmPlan(k, n, self.sft_is_own), self.workers
        ) > deadline - time.time():
            k, n = (k - 1, n) if k > 1 else (k, n - 1)
        return k, n

    def confirm(self, result: SearchResult, deadline: float = math.inf) -> None:
        """The confirm phase: the finalists and the references, retrained with fresh seeds, scored on test."""
        refs = self.refs()
        top_k, n_seeds = self.fit_confirm(result, deadline)
        self.confirmed = {"finalists": top_k, "seeds": n_seeds}
        whys = {v.name: v.why for v in self.variants}
        for alias, name in result.aliases.items():  # one trial trained both: say so where the finalist is named
            if whys.get(name):
                whys[name] = f"{whys[name]} (also {alias}: the same config)"
        fins = finalist_candidates(
            finalists(result, self.metric, top_k), {c.name for c in refs}, whys, run_values(self.base)
        )
        self.candidates = refs + fins
        seeds = [CONFIRM_SEED0 + i for i in range(n_seeds)]
        self.spec = confirm_spec(
            f"investigate_{self.run_dir.name}", self.base, str(self.sft), self.split_seed, self.candidates, seeds
        )
        run_grid(
            self.spec,
            self.out / "confirm",
            workers=self.workers,
            progress=self.progress,
            backend=self.backend,
            address=self.address,
            stack=self.stack,  # the confirm grid's seeds of a finalist train as one stacked model
        )

    def run(self) -> Verdict:
        t0 = time.perf_counter()
        # the search stops when the time left is what the confirm phase needs (estimated from the trials' times);
        # BUDGET_RESERVE of the budget is kept back for the verdict's statistics and for run times that grow when the
        # machine gets busier than during the trials (measured: 20-27 s over a 20-minute budget on a loaded machine)
        deadline = time.time() + (1 - BUDGET_RESERVE) * self.budget_s
        result = self.search(deadline)
        self.confirm(result, deadline)
        self.wall_s = time.perf_counter() - t0
        return self.verdict()

    def frames(self) -> tuple[Any, Any]:
        assert self.spec is not None
        return collect(self.out / "confirm", self.spec, worlds=[BASE_WORLD], return_per_query=True)

    # ------------------------------------------------------------------------------------------------ verdict
    def verdict(self) -> Verdict:
        assert self.spec is not None and self.search_result is not None
        frame, pq = self.frames()
        d = METRIC_DIRECTION[self.metric]
        table = weigh(frame, pq, self.metric, self.candidates)
        rows = table.set_index("variant")
        best = choose(table, self.metric)
        own = {c.name: c.retrain_sft for c in self.candidates}
        refs = baseline_table(self.splits.test)
        references = {str(k): float(v) for k, v in refs[self.metric].items()} if self.metric in refs else {}
        family = int(table["p_holm"].notna().sum())
        shippable = table[table["shippable"]]
        top = str(shippable.loc[(shippable["vs_sft"] * d).idxmax(), "variant"]) if len(shippable) else RUN
        if best is not None:
            r = rows.loc[best]
            rec = "rce_only" if self._is_rce_only(best) else "variant"
            gain = source_of_gain(frame, best, own[best])
            sentence = (
                f"Ship `{best}`: it beats the SFT you have by {r['vs_sft']:+.3f} {self.metric} "
                f"[{r['vs_sft_low']:+.3f}, {r['vs_sft_high']:+.3f}] on the test split the search never saw"
                + (f"; {gain}" if gain else "")
            )
            why = f"{best} ({r['what']}) is better than SFT after Holm's correction over {family} comparisons"
            eff_sft, seed_effects = (
                [float(r["vs_sft"]), float(r["vs_sft_low"]), float(r["vs_sft_high"])],
                list(r["seed_effects"]),
            )
        else:
            best, rec = SFT_ONLY, "keep_sft"
            r = rows.loc[top]
            effect = f"is {r['vs_sft']:+.3f} [{r['vs_sft_low']:+.3f}, {r['vs_sft_high']:+.3f}] {self.metric}"
            if not r["own_sft"] and r["seeds"] and r["kept_sft"] == r["seeds"]:
                effect = f"kept SFT in {r['kept_sft']} of {r['seeds']} seeds"
            sentence = (
                "Keep the SFT you have: nothing beat it on test after Holm's correction; the best candidate, "
                f"`{top}`, {effect}"
            )
            why = f"no candidate is better than SFT after Holm's correction over {family} comparisons"
            eff_sft, seed_effects = self._keep_sft_effect(rows)
        rl = rl_line(table, self.metric, skip=best if best != SFT_ONLY else top)
        if rl:
            sentence += f"; {rl}"
        if best == SFT_ONLY:
            back = compare(frame, pq, {SFT_ONLY: (SFT_ONLY, RUN)}, metrics=[self.metric], stage=SHIPPED, n_boot=1000)
            eff_run = _triple(back.iloc[0])
        elif best == RUN:
            eff_run = [0.0, 0.0, 0.0]
        else:
            vs_run = compare(frame, pq, {best: (best, RUN)}, metrics=[self.metric], stage=SHIPPED, n_boot=1000)
            eff_run = _triple(vs_run.iloc[0])
        notes = below_reference(table, best, references, self.metric, self.can_residual)
        final = frame[(frame["split"] == "test") & (frame["stage"] == SHIPPED)].drop_duplicates(["variant", "seed"])
        return Verdict(
            metric=self.metric,
            recommendation=rec,
            variant=best,
            config=str(self.write_config(best)),
            effect_vs_sft=eff_sft,
            effect_vs_run=eff_run,
            causes=causes_from_search(self.findings, self.variants, self.search_result, d),
            why=why,
            table=table,
            references=references,
            runs=len(final),
            wall_s=self.wall_s,
            power=power_line(
                len(self.splits.test),
                self.cfg.data.test_frac,
                self.confirmed.get("seeds", 0),
                self.metric,
                [float(m) for m in table["mde"]] if "mde" in table else (),
            ),
            sft=str(self.sft),
            run_seconds=float(final["wall_s"].sum()) if "wall_s" in final.columns else 0.0,
            sentence=sentence + ".",
            search=self._search_summary(),
            notes=notes,
            seed_effects=seed_effects,
        )

    def _search_summary(self) -> dict[str, Any]:
        """What verdict.json says of the search: trial counts, its wall time, the space, the importances, the
        budget and the confirm phase it left room for."""
        res = self.search_result
        assert res is not None
        return {
            **res.counts,
            "trials": res.counts["complete"] + res.counts["pruned"] + res.counts["failed"],
            "wall_s": round(res.wall_s, 1),
            "stacked": sum(bool(t.get("stacked")) for t in res.trials),  # trials trained in a stack (--stack auto)
            "stack_note": self.stack_note,  # why --stack auto ran the search one trial at a time (None: it did not)
            "aliases": res.aliases,  # {variant: the variant whose trial it shared}: one config, trained once
            "params": [p.name for p in self.params],
            "importances": importances(res.study),
            "budget_s": self.budget_s,
            "confirm": self.confirmed,
        }

    def _is_rce_only(self, name: str) -> bool:
        assert self.spec is not None
        own = any(o.startswith(("sft.", "model.")) for o in self.spec.variants[name])
        return not own and self.spec.value(name, "grpo.epochs") == 0 and self.spec.value(name, "rce.epochs") > 0

    def _keep_sft_effect(self, rows: Any) -> tuple[list[float], list[float]]:
        """keep_sft's effect vs the SFT you have: 0 for an imported SFT (the config trains nothing); for an SFT the
        run trained, the retrained SFT's effect, whose interval holds the SFT's seed noise."""
        if SFT_RETRAINED not in rows.index:
            return [0.0, 0.0, 0.0], []
        r = rows.loc[SFT_RETRAINED]
        return [float(r["vs_sft"]), float(r["vs_sft_low"]), float(r["vs_sft_high"])], list(r["seed_effects"])

    def write_config(self, variant: str) -> Path:
        """The complete YAML of ``variant`` that ``v3kit run --config`` trains as is: the run's data and test split
        (``data.split_seed``), and the run's SFT checkpoint (``sft.checkpoint``) unless the variant trains its own."""
        assert self.spec is not None
        own_sft = variant in self.spec.retrain_sft or any(
            o.startswith(("sft.", "model.")) for o in self.spec.variants[variant]
        )
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
    """Doctor, search on val, confirm on test and verdict for ``run_dir``; writes ``verdict.md``/``verdict.json``
    (plus the recommended config and the figures) to ``out`` (default ``RUN_DIR/investigate``). ``options`` are
    those of :class:`Investigation` (``metric``, ``out``, ``budget_minutes``, ``workers``, ``top_k``,
    ``confirm_seeds``, ``max_trials``, ``space``, ``progress``, ``smoke``: overrides added to every run, ``only``,
    ``backend``, ``address``, ``seed``, ``stack``)."""
    inv = Investigation(run_dir, **options)
    v = inv.run()
    write_verdict(v, inv.run_dir, inv.out, inv.search_result.study if inv.search_result else None)
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
    mean = float(np.mean(effects))
    lo, hi = prediction_interval(v["effect_vs_sft"], v.get("seed_effects", []), len(seeds))
    return {"effects": effects, "mean": mean, "interval": [lo, hi], "inside": lo <= mean <= hi}
