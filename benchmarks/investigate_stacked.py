"""``v3kit investigate`` with ``--stack off`` against ``--stack auto``: wall time and decision, side by side.

    PYTHONPATH=$PWD python benchmarks/investigate_stacked.py [--tasks stdlib,module_routing] [--trials 30]
        [--budget-minutes 30] [--top-k 2] [--confirm-seeds 3] [--rounds 1] [--out /tmp/investigate_stacked]

For each task: one ``v3kit run`` (kept between invocations), then ``v3kit investigate`` on it twice under the same
budget, trial cap, top-k, confirm seeds and one worker, first ``--stack off`` then ``--stack auto`` (with
``--rounds 2``, then ``auto`` and ``off`` again in that order: the speed of a VM drifts 15-20% within minutes, and
one pair's ratio with it; the ratio is then of both rounds' summed times). Prints, per
task, the wall time of each, their ratio, the search phase's own wall time and trial counts, each trial's run time
(its share of its stack's wall time when stacked), and whether both reached the same decision (recommendation and
recommended variant). Then a probe of the stacks themselves: the largest stack of the ``auto`` search retrained
without pruning, its trials one after another and then as one stack (the speed-up a stack of those trials gets,
whatever the search did around it). ``--probe-only`` reruns the probe on existing outputs. Writes
``OUT/results.json``. Tasks: ``stdlib`` (the built-in stdlib code-search example),
and any ``NAME`` with a table ``$V3KIT_TASKS/NAME.parquet`` (default ``~/.cache/v3kit/tasks``, built by
``benchmarks/real_text_tasks.py``), e.g. ``module_routing`` (2,400 queries) or ``doc_paraphrase`` (2,033).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TASKS = Path(os.environ.get("V3KIT_TASKS", Path.home() / ".cache" / "v3kit" / "tasks"))
V3KIT = [sys.executable, "-m", "v3kit"]


def load() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0] if Path("/proc/loadavg").exists() else "?"


def train_run(task: str, runs: Path) -> Path:
    """The run that investigate starts from (trained once)."""
    run_dir = runs / task
    if (run_dir / "summary.csv").exists():
        return run_dir
    data = (
        ["--config", "configs/stdlib_search.yaml"]
        if task == "stdlib"
        else ["--set", f"data.path={TASKS}/{task}.parquet"]
    )
    subprocess.run([*V3KIT, "run", *data, "--set", f"run_dir={run_dir}", "--set", "progress=false"], check=True)
    return run_dir


def trials(out: Path) -> list[dict]:
    """Every trial of the search's journal: state, value, run_s (its share of its stack), stacked, stack size."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(out / "search" / "study.journal")))
    study = optuna.load_study(study_name="investigate", storage=storage)
    return [
        {
            "number": t.number,
            "name": t.user_attrs.get("name"),
            "state": t.state.name.lower(),
            "run_s": t.user_attrs.get("run_s"),
            "stack_s": t.user_attrs.get("stack_s", t.user_attrs.get("run_s")),
            "stacked": bool(t.user_attrs.get("stacked", False)),
            "stack": int(t.user_attrs.get("stack", 1)),
            "stack_of": t.user_attrs.get("stack_of", t.number),
            "overrides": t.user_attrs.get("overrides", []),
            "own_sft": bool(t.user_attrs.get("own_sft", False)),
        }
        for t in study.get_trials(deepcopy=False)
    ]


def investigate(run_dir: Path, out: Path, stack: str, args: argparse.Namespace) -> dict:
    cmd = [
        *V3KIT,
        "investigate",
        str(run_dir),
        "--out",
        str(out),
        "--stack",
        stack,
        "--budget-minutes",
        str(args.budget_minutes),
        "--trials",
        str(args.trials),
        "--top-k",
        str(args.top_k),
        "--confirm-seeds",
        str(args.confirm_seeds),
        "--workers",
        "1",
    ]
    load0 = load()
    t0 = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    v = json.loads((out / "verdict.json").read_text())
    what = next((r.get("what") for r in v.get("variants", []) if r.get("variant") == v["variant"]), None)
    rows = trials(out)
    run_s = [r["run_s"] for r in rows if r["run_s"] is not None]
    return {
        "wall_s": wall,
        "load_before": load0,
        "load_after": load(),
        "recommendation": v["recommendation"],
        "variant": v["variant"],
        "effect_vs_sft": v["effect_vs_sft"],
        "what": what,
        "search": {k: v["search"][k] for k in ("trials", "complete", "pruned", "failed", "wall_s", "confirm")},
        "confirm_run_seconds": v.get("run_seconds"),
        "trial_run_s_median": statistics.median(run_s) if run_s else None,
        "trial_run_s_sum": sum(run_s),
        "stacked_trials": sum(r["stacked"] for r in rows),
        "stack_sizes": sorted({r["stack"] for r in rows}),
        "trials": rows,
    }


def probe(run_dir: Path, out: Path, root: Path) -> dict:
    """The largest stack of ``out``'s search, retrained without pruning: one after another, then stacked."""
    from v3kit.ablate.backends import worker_config
    from v3kit.config import load_config
    from v3kit.data.contract import Splits
    from v3kit.doctor.investigate import Investigation
    from v3kit.pipeline import prepare_data, run_pipeline
    from v3kit.pipeline_stacked import run_stacked

    rows = [r for r in trials(out) if r["stacked"]]
    if not rows:
        return {}
    shutil.rmtree(root / "probe", ignore_errors=True)
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["stack_of"], r["stack"]), []).append(r)
    group = max(groups.values(), key=len)
    inv = Investigation(run_dir, out=root / "probe" / "inv", progress=False)
    split = prepare_data(load_config(None, [*inv.base, f"seed={inv.split_seed}", "progress=false"]))
    splits = Splits(train=split.train, val=split.val, test=split.val)
    sft = None if group[0]["own_sft"] else str(inv.sft)

    def cfgs(kind: str) -> list:
        return [
            worker_config(
                load_config(
                    None,
                    [
                        *inv.base,
                        *r["overrides"],
                        "seed=0",
                        f"run_dir={root / 'probe' / kind / str(i)}",
                        "progress=false",
                    ],
                )
            )
            for i, r in enumerate(group)
        ]

    t0 = time.perf_counter()
    for c in cfgs("alone"):
        run_pipeline(c, sft_checkpoint=sft, splits=splits)
    alone = time.perf_counter() - t0
    t0 = time.perf_counter()
    out_stacked = run_stacked(cfgs("stacked"), sft_checkpoint=sft, splits=splits)
    stacked = time.perf_counter() - t0
    return {
        "trials": [r["number"] for r in group],
        "own_sft": group[0]["own_sft"],
        "alone_s": alone,
        "stacked_s": stacked,
        "speedup": alone / stacked,
        "batched": out_stacked.stacked,
        "overrides": group[0]["overrides"],
        "load": load(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="stdlib,module_routing")
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--budget-minutes", type=float, default=30.0)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--confirm-seeds", type=int, default=3)
    p.add_argument("--out", default="/tmp/investigate_stacked")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="invocations of each mode, off then auto, then auto then off, ...; the ratio is of their summed times "
        "(2 or more: a drift of the machine's speed over the rounds falls on both modes)",
    )
    p.add_argument("--probe-only", action="store_true", help="only the probe, on the outputs of an earlier call")
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    results = {"args": vars(args), "cpus": os.cpu_count(), "tasks": {}}
    for task in args.tasks.split(","):
        run_dir = train_run(task, root / "runs")
        if args.probe_only:
            pr = probe(run_dir, root / "investigate" / f"{task}_auto", root)
            results["tasks"][task] = {"probe": pr}
            print(f"{task} probe: {json.dumps({k: v for k, v in pr.items() if k != 'overrides'})}", flush=True)
            (root / "results_probe.json").write_text(json.dumps(results, indent=1))
            continue
        res: dict = {}
        walls: dict[str, list[float]] = {"off": [], "auto": []}
        for r in range(args.rounds):
            # off then auto, then auto then off, ...: a drift of the machine's speed over the rounds falls on both
            for stack in ("off", "auto") if r % 2 == 0 else ("auto", "off"):
                out = root / "investigate" / (f"{task}_{stack}" if r == 0 else f"{task}_{stack}_r{r}")
                if out.exists():
                    subprocess.run(["rm", "-rf", str(out)], check=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                got = investigate(run_dir, out, stack, args)
                walls[stack].append(got["wall_s"])
                if r == 0:
                    res[stack] = got
                elif (got["recommendation"], got["what"]) != (res[stack]["recommendation"], res[stack]["what"]):
                    res.setdefault("rounds_differ", []).append(f"round {r} {stack}: {got['recommendation']}")
                print(
                    f"{task} --stack {stack} (round {r + 1}): {got['wall_s']:.0f} s (search "
                    f"{got['search']['wall_s']:.0f} s, {got['search']['trials']} trials: {got['search']['complete']} "
                    f"complete, {got['search']['pruned']} pruned; median trial {got['trial_run_s_median']:.1f} s; "
                    f"{got['stacked_trials']} stacked) -> {got['recommendation']} {got['variant']}; load "
                    f"{got['load_before']} -> {got['load_after']}",
                    flush=True,
                )
        res["walls"] = walls
        res["round_ratios"] = [a / b for a, b in zip(walls["off"], walls["auto"])]
        off, auto = res["off"], res["auto"]
        res["ratio"] = sum(walls["off"]) / sum(walls["auto"])  # every round's time, so a drift cancels
        res["search_ratio"] = off["search"]["wall_s"] / max(auto["search"]["wall_s"], 1e-9)
        # a sampled finalist is named by its trial number, which differs from one search to the next: the decision
        # is the recommendation, the variant when it is a named one, and the effect's interval
        (a, lo_a, hi_a), (b, lo_b, hi_b) = off["effect_vs_sft"], auto["effect_vs_sft"]
        res["same_recommendation"] = off["recommendation"] == auto["recommendation"]
        sampled = off["variant"].startswith("trial") or auto["variant"].startswith("trial")
        res["same_variant"] = off["what"] == auto["what"] if sampled else off["variant"] == auto["variant"]
        res["effects_overlap"] = max(lo_a, lo_b) <= min(hi_a, hi_b)
        results["tasks"][task] = res
        print(
            f"{task}: off/auto wall {res['ratio']:.2f}x (rounds {', '.join(f'{x:.2f}' for x in res['round_ratios'])}; "
            f"search {res['search_ratio']:.2f}x in round 1); same recommendation: "
            f"{res['same_recommendation']}; same variant: {res['same_variant']} ({off['variant']} vs {auto['variant']}); "
            f"effect vs SFT {a:+.3f} [{lo_a:+.3f}, {hi_a:+.3f}] vs {b:+.3f} [{lo_b:+.3f}, {hi_b:+.3f}]",
            flush=True,
        )
        for stack in ("off", "auto"):
            print(f"  {stack}: {res[stack]['what']}", flush=True)
        res["probe"] = pr = probe(run_dir, root / "investigate" / f"{task}_auto", root)
        print(f"{task} probe: {json.dumps({k: v for k, v in pr.items() if k != 'overrides'})}", flush=True)
        (root / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
