"""The ``v3kit investigate RUN_DIR`` command: its options (with their typo bounds) and what it prints.

The work is :class:`v3kit.doctor.investigate.Investigation` (search on val, confirm on test, the verdict) and
:func:`v3kit.doctor.investigate.reproduce` (``--reproduce K``); this module turns the command line into those calls
and writes ``verdict.md`` / ``verdict.json``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..ablate.cli import MAX_WORKERS, add_backend_args, add_stack_arg
from ..bounds import cli_number
from ..rundir import atomic_write_text, json_text
from .investigate import Investigation, reproduce
from .verdict_report import VERDICT_JSON, VERDICT_MD, verdict_markdown, write_verdict


def cmd_investigate(args: argparse.Namespace) -> int:
    inv = Investigation(
        args.run_dir,
        metric=args.metric,
        out=args.out,
        budget_minutes=args.budget_minutes,
        workers=args.workers,
        top_k=args.top_k,
        confirm_seeds=args.confirm_seeds,
        max_trials=args.trials,
        space=args.space,
        progress=not args.no_progress,
        smoke=args.set or [],
        only=args.only.split(",") if args.only else None,
        backend=args.backend,
        address=args.address,
        stack=args.stack,
    )
    print(
        f"investigating {inv.run_dir}: search over {len(inv.params)} parameters (up to {inv.max_trials} trials, "
        f"{len(inv.variants) - 1} enqueued first), then the top {inv.top_k} and the references on test with "
        f"{inv.confirm_seeds} fresh seeds; budget {args.budget_minutes:g} min, {args.workers} worker(s) -> {inv.out}"
    )
    v = inv.run()
    write_verdict(v, inv.run_dir, inv.out, inv.search_result.study if inv.search_result else None)
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
            f"{'inside' if rep['inside'] else 'OUTSIDE'} the interval where {len(seeds)} fresh seeds should fall "
            f"[{lo:+.4f}, {hi:+.4f}] (the verdict's, widened by its per-seed spread)"
        )
    return 0


REPRODUCE_SEED0 = 1000  # fresh seeds, never among a grid's (which count from 0)
# Bounds of the numeric options (typo guards): a seed is a full training run, a budget of ~2 years is no budget.
MAX_SEEDS, MAX_BUDGET_MINUTES, MAX_TOP_K, MAX_TRIALS = 1000, 1e6, 100, 100_000


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
        help="search and confirm together finish inside this",
    )
    p.add_argument(
        "--workers",
        type=cli_number(int, 1, MAX_WORKERS),
        default=1,
        help="parallel worker processes (one torch thread each)",
    )
    p.add_argument("--out", help="output directory (default: RUN_DIR/investigate)")
    p.add_argument(
        "--top-k",
        type=cli_number(int, 1, MAX_TOP_K),
        default=3,
        help="configurations of the search that the confirm phase retrains",
    )
    p.add_argument(
        "--confirm-seeds", type=cli_number(int, 2, MAX_SEEDS), default=3, help="fresh seeds of the confirm phase (>= 2)"
    )
    p.add_argument(
        "--trials",
        type=cli_number(int, 1, MAX_TRIALS),
        default=200,
        help="most trials of the search (the budget may stop it first)",
    )
    p.add_argument(
        "--space", help="search-space YAML (default: the shipped configs/search_space.yaml; its header: the format)"
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override added to every run of the grid (e.g. fewer epochs for a quick look)",
    )
    add_backend_args(p)
    add_stack_arg(p)
    p.add_argument(
        "--only",
        metavar="V1,V2",
        help="search only these enqueued variants (plus 'run'), e.g. rce_moving,rce_grpo_anchored for a quick "
        "look; the confirm phase still weighs the best of them against the references",
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
