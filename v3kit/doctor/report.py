"""Running the doctor (:func:`diagnose`), its text report (wrapped, suggestions ordered by evidence) and its CLI."""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from ..rundir import atomic_write_frame
from . import data_checks, grpo_checks  # noqa: F401 - importing them registers their checks (order: REPORT_ORDER)
from .context import (
    REGISTRY,
    REPORT_ORDER,
    DoctorContext,
    Finding,
    Thresholds,
    fmt_num,
    load_run,
    skip_finding,
    switch_tokens,
)
from .grid import GRID_FILE, write_doctor_grid

# ---------------------------------------------------------------- public API


def diagnose(
    run: str | Path | pd.DataFrame,
    config: dict[str, Any] | None = None,
    thresholds: Thresholds | None = None,
    *,
    splits: Any = None,
    sft: tuple[Any, float] | None = None,
    only: Iterable[str] | None = None,
) -> list[Finding]:
    """Every registered check (see :func:`check_names`) on a run dir (reads ``metrics.csv`` and ``config.yaml``) or
    on a metrics frame.

    ``config`` (nested dict as in ``config.yaml``, or a ``RunConfig``) overrides the run dir's; without one the
    checks still run, but cause attribution and some suggestions are less specific. The checks that need the data
    (RCE's loss floor, the reward shortcut, the baselines) rebuild it from a run dir's config, or use ``splits``;
    ``sft`` = (SFT model, its logit temperature) stands in for the run dir's SFT checkpoint. ``only``: run just
    these checks (e.g. notebook 02 shows ``rce_converged``, the one RCE-convergence verdict).
    """
    th = thresholds or Thresholds()
    if set(REGISTRY) != set(REPORT_ORDER):
        raise RuntimeError(f"doctor checks registered {sorted(REGISTRY)} but REPORT_ORDER lists {list(REPORT_ORDER)}")
    wanted = list(REPORT_ORDER) if only is None else list(only)
    unknown = sorted(set(wanted) - set(REGISTRY))
    if unknown:
        raise ValueError(f"unknown doctor check(s) {unknown}; the checks are {list(REPORT_ORDER)}")
    if isinstance(run, pd.DataFrame):
        df, file_cfg, run_dir = run, {}, None
    else:
        df, file_cfg = load_run(run)
        run_dir = Path(run)
    if config is not None and dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    ctx = DoctorContext(df, file_cfg if config is None else config, th, run_dir, splits, sft)
    findings = []
    for name in REPORT_ORDER:
        if name not in wanted:
            continue
        try:
            f = REGISTRY[name](ctx, name)
            if f.triggered and not f.switches:
                f.switches = switch_tokens(f.suggestion)
            findings.append(f)
        except (KeyError, ValueError, TypeError, IndexError) as e:  # malformed input: report, never crash
            findings.append(skip_finding(name, f"could not evaluate ({type(e).__name__}: {e})"))
    return findings


def report_frame(findings: Iterable[Finding]) -> pd.DataFrame:
    """One row per finding; columns as the :class:`Finding` fields."""
    cols = [f.name for f in dataclasses.fields(Finding)]
    return pd.DataFrame([dataclasses.asdict(f) for f in findings], columns=cols)


def format_report(findings: Iterable[Finding], title: str | None = None, run: str | Path | None = None) -> str:
    """Readable text: one line per check (⚠ flagged, ✔ fine, – skipped) with its number and threshold, then, under
    each flagged check, the switch to *test* and the ablation that tests it against the run (``run``: the run dir
    the commands name)."""
    findings = list(findings)
    width = max((len(f.check) for f in findings), default=0)
    where = str(run) if run is not None else "RUN_DIR"
    lines = [title or "GRPO health report"]

    def add(text: str, indent: str = "", more: str | None = None) -> None:
        lines.extend(
            textwrap.wrap(
                text,
                REPORT_WIDTH,
                initial_indent=indent,
                subsequent_indent=indent if more is None else more,
                break_on_hyphens=False,
            )
            or [indent]
        )

    for f in findings:
        mark = "⚠" if f.triggered else ("–" if f.value is None else "✔")
        num = "" if f.value is None else f"value {fmt_num(f.value)}"
        if f.threshold is not None and f.value is not None:
            num += f" (threshold {fmt_num(f.threshold)})"
        lines.append(f"{mark} {f.check:<{width}}  {num}".rstrip())
        add(f.message, "    ")
        if f.triggered and f.suggestion:
            add(f"-> test: {f.suggestion}", "    ", "       ")
    flagged = [f for f in findings if f.triggered]
    skipped = sum(f.value is None and not f.triggered for f in findings)
    summary = f"{len(flagged)} of {len(findings)} checks flagged" + (
        f": {', '.join(f.check for f in flagged)}" if flagged else ""
    )
    add(summary + (f"; {skipped} skipped" if skipped else ""))
    ordered = [f for f in evidence_order(flagged) if f.switches]
    if ordered:
        add(
            "What to test, strongest evidence first (checks measured on the label metric, then on the data, then "
            "on GRPO's mechanics; within each, by how far past its threshold):"
        )
        for i, f in enumerate(ordered, 1):
            add(f"{i}. {f.check}: " + " | ".join(f.switches), "  ", "     ")
        add(
            f"Test them against the run: v3kit investigate {where} (a verdict: what to ship), or v3kit doctor "
            f"{where} --grid && v3kit ablate --grid {Path(where) / GRID_FILE}"
        )
    if flagged:
        add("Suggestions are hypotheses from one run: adopt a switch only once its ablation beats 'run'.")
    return "\n".join(lines)


REPORT_WIDTH = 100  # report lines wrap here (terminals, notebooks and the README transcript)

# The evidence behind a flagged check, strongest first: a check measured on the label metric itself (SFT below a
# trivial ranker, a label metric that fell while the reward rose) says directly what the shipped model loses; a check
# on the data or RCE's fit (a reward shortcut, an RCE that did not move) says why it might; the checks of GRPO's
# mechanics (ratios, clipping, KL, entropy) describe how the run trained. Within a tier, by how far past its threshold.
_EVIDENCE_TIERS = {"baselines": 0, "reward_vs_label": 0, "reward_shortcut": 1, "rce_converged": 1}
_MECHANICS = 2


def evidence(f: Finding) -> float:
    """How far a flagged finding is past its threshold, as a factor >= 1 (either direction); 1 when unknown."""
    if f.value is None or f.threshold is None or f.value <= 0 or f.threshold <= 0:
        return 1.0
    return max(f.value / f.threshold, f.threshold / f.value)


def evidence_order(findings: Iterable[Finding]) -> list[Finding]:
    """Flagged findings by tier of evidence (label metric, then data, then GRPO's mechanics), each tier by
    :func:`evidence` (strongest first)."""
    return sorted(findings, key=lambda f: (_EVIDENCE_TIERS.get(f.check, _MECHANICS), -evidence(f)))


def cmd_doctor(args: argparse.Namespace) -> int:
    run = Path(args.run_dir)
    findings = diagnose(run)
    print(format_report(findings, title=f"GRPO health report: {run}", run=run))
    if args.csv:
        atomic_write_frame(args.csv, report_frame(findings))
    if args.grid:
        path = write_doctor_grid(run, findings)
        print(f"wrote {path}: test the suggestions with `v3kit ablate --grid {path}`")
    return 0


def register_cli(subparsers: Any) -> None:
    """``v3kit doctor RUN_DIR [--grid]``: the GRPO health report of a finished (or partial) run."""
    p = subparsers.add_parser("doctor", help="GRPO health report of a run dir: what looks wrong and what to test")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run dir written by `v3kit run` (holds metrics.csv)")
    p.add_argument("--csv", metavar="PATH", help="also save the findings as a table")
    p.add_argument(
        "--grid",
        action="store_true",
        help="also write RUN_DIR/doctor_grid.yaml: an ablation grid that tests each suggested switch "
        "against the run's own config (run it with `v3kit ablate --grid`)",
    )
    p.set_defaults(func=cmd_doctor)
