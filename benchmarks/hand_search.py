"""A wide hand search on one task: SFT settings, scoring heads, residual towers, RCE and GRPO variants, 3 seeds each.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/hand_search.py TASK [--seeds 0 1 2] [--workers 1]
        [--out runs/hand_search/TASK] [--only V1,V2]

TASK is one of :data:`TASKS`: ``stdlib`` (the built-in stdlib code-search example with its own config),
``synthetic`` (the default synthetic world, judged by ``utility@1``), ``synthetic_bias1`` (``reward_bias`` 1.0),
``doc_paraphrase`` and ``module_routing`` (the two real-text tables of ``benchmarks/real_text_tasks.py``, under
``$V3KIT_TASKS``, default ``~/.cache/v3kit/tasks``, run with the seed settings as a new user would).

Design, so that every number is comparable:

* Every run of a task uses one split (``data.split_seed=0``) and is scored on its test queries.
* Seed ``s`` is a grid of its own (``benchmarks/hand_search.py`` runs ``v3kit.ablate.run_grid`` with
  ``seeds=[s]`` and ``sft_seed=s``), so a variant that trains its own SFT (a new head, lr, epochs) trains it with
  seed ``s``, and RL variants start from the default SFT trained with seed ``s``: the SFT seed noise is in every
  interval, not only the RL seeds'.
* Each variant's shipped model is the run's ``selected`` model; RL variants keep their best val epoch on the task's
  metric (``select=best_val``), as a careful hand search would (the ``run`` variant ships the end, as configured).
* Effects are paired differences against ``sft`` (the default SFT of the same seed) on the same test queries,
  with the kit's two-level (seeds x queries) bootstrap (:func:`v3kit.ablate.stats.bootstrap_mean_ci`).
* References on the same test split: the raw-feature cosine (the residual model before training: shippable) and
  the reward's argmax (needs the reward at serving time).

Writes ``benchmarks/results_hand_search/<TASK>.csv`` (one row per variant: mean, effect vs SFT [95% CI], per-seed
means) and ``<TASK>_runs.csv`` (one row per variant and seed), both small and committed; the runs themselves stay
under ``--out`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from v3kit.ablate.grid import METRIC_DIRECTION, parse_grid
from v3kit.ablate.runner import run_grid
from v3kit.ablate.stats import bootstrap_mean_ci
from v3kit.config import load_config, to_dict
from v3kit.pipeline import prepare_data
from v3kit.train.metrics import per_group_metrics

ROOT = Path(__file__).resolve().parent
TASKS_DIR = Path(os.environ.get("V3KIT_TASKS", Path.home() / ".cache" / "v3kit" / "tasks"))
# task -> (config file or None for the seed settings, base overrides, metric)
TASKS = {
    "stdlib": ("v3kit/configs/stdlib_search.yaml", [], "acc@1"),
    "synthetic": (None, [], "utility@1"),
    "synthetic_bias1": (None, ["data.synthetic.reward_bias=1.0"], "utility@1"),
    "doc_paraphrase": (None, [f"data.path={TASKS_DIR / 'doc_paraphrase.parquet'}"], "acc@1"),
    "module_routing": (None, [f"data.path={TASKS_DIR / 'module_routing.parquet'}"], "acc@1"),
}
NO_RL = ["rce.epochs=0", "grpo.epochs=0"]
MOVING = ["rce.lr=1e-4", "grpo.lr=1e-4"]
ANCHORED = ["grpo.old_policy=refresh_at_start", "grpo.kl_reference=sft", "grpo.kl_estimator=exact"]


def variants(metric: str) -> dict[str, list[str]]:
    """The hand search: SFT alone under other settings and heads, then RL variants on the default SFT."""
    best_val = ["select=best_val", f"select_metric={metric}"]
    v: dict[str, list[str]] = {
        "sft": NO_RL,  # the reference: the config's own SFT
        "sft_lr3e-4": [*NO_RL, "sft.lr=3e-4"],
        "sft_lr3e-3": [*NO_RL, "sft.lr=3e-3"],
        "sft_5ep": [*NO_RL, "sft.epochs=5"],
        "sft_30ep": [*NO_RL, "sft.epochs=30"],
        "sft_wide": [*NO_RL, "model.hidden=[256]", "model.emb_dim=128"],
    }
    for t in (0.05, 0.1, 0.3, 1.0):
        v[f"cosine_t{t}"] = [*NO_RL, "model.normalize=true", f"model.sim_temperature={t}"]
    for t in (0.05, 0.1, 0.3):
        v[f"residual_t{t}"] = [*NO_RL, "model.residual=true", f"model.sim_temperature={t}"]
    v["residual_t0.1_5ep"] = [*NO_RL, "model.residual=true", "model.sim_temperature=0.1", "sft.epochs=5"]
    v["residual_t0.1_lr1e-4"] = [*NO_RL, "model.residual=true", "model.sim_temperature=0.1", "sft.lr=1e-4"]
    # hidden=[] makes the residual correction one linear layer: normalize(x + W x + b), W and b starting at 0.
    v["residual_linear_t0.1"] = [*NO_RL, "model.residual=true", "model.hidden=[]", "model.sim_temperature=0.1"]
    v["residual_linear_t0.05"] = [*NO_RL, "model.residual=true", "model.hidden=[]", "model.sim_temperature=0.05"]
    v.update(
        {
            "run": [],  # the config as it is: RCE + GRPO, shipping the end
            "run_best_val": best_val,
            "rce_only_lr1e-4": [*best_val, "rce.lr=1e-4", "grpo.epochs=0"],
            "rce_lr1e-4_label0.5": [*best_val, "rce.lr=1e-4", "rce.label_weight=0.5", "grpo.epochs=0"],
            "grpo_lr1e-4": [*best_val, *MOVING],
            "grpo_lr1e-4_kl0.01": [*best_val, *MOVING, "grpo.kl_beta=0.01"],
            "grpo_lr1e-4_anchored": [*best_val, *MOVING, *ANCHORED],
            "grpo_lr1e-4_anchored_debias": [*best_val, *MOVING, *ANCHORED, "reward.debias=candidate_features"],
            "residual_t0.1_grpo_anchored": [
                *best_val,
                *MOVING,
                *ANCHORED,
                "model.residual=true",
                "model.sim_temperature=0.1",
            ],
        }
    )
    return v


def reference_outcomes(cfg, metric: str) -> dict[str, np.ndarray]:
    """Per test query: the raw-feature cosine's and the reward argmax's ``metric`` (None-free: both need no
    training). The raw cosine needs query and candidate features of one dim."""
    test = prepare_data(cfg).test
    out = {}
    if test.query_dim == test.cand_dim:
        q = torch.nn.functional.normalize(test.query_x, dim=-1)
        c = torch.nn.functional.normalize(test.cand_x, dim=-1)
        out["ref_raw_cosine"] = torch.einsum("bd,bgd->bg", q, c)
    out["ref_reward_argmax"] = test.rewards.clone()
    got = {}
    for name, scores in out.items():
        logp = torch.log_softmax(scores.masked_fill(~test.mask, -1e9) / 0.05, dim=1)
        m = per_group_metrics(
            logp, test.labels, test.rewards, test.mask, utility=test.utility, logp=logp, ref_logp=logp
        )
        got[name] = m[metric].double().numpy()
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("task", choices=sorted(TASKS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=None, help="comma-separated variants (sft is always run)")
    ap.add_argument(
        "--recommended",
        default=None,
        help="an investigation's recommended.yaml: run only it (as variant 'recommended') and sft, with the same "
        "seeds, split and per-seed SFTs as the hand search, so the two compare on one footing",
    )
    args = ap.parse_args()
    config, base, metric = TASKS[args.task]
    base = [*base, "data.split_seed=0"]
    var = variants(metric)
    if args.recommended:
        var = {"sft": var["sft"], "recommended": recommended_overrides(args.recommended, config, base)}
        print("recommended:", " ".join(var["recommended"]), flush=True)
    elif args.only:
        keep = {"sft", *args.only.split(",")}
        var = {k: v for k, v in var.items() if k in keep}
    suffix = "_recommended" if args.recommended else ""
    out = Path(args.out or f"runs/hand_search/{args.task}{suffix}")
    frames = []
    for s in args.seeds:
        spec = parse_grid(
            {
                "name": f"{args.task}_seed{s}",
                "config": config,
                "base": base,
                "seeds": [s],
                "sft_seed": s,
                "variants": var,
                "reference": "sft",
            }
        )
        res = run_grid(spec, out / f"seed{s}", workers=args.workers, progress=False)
        print(f"seed {s}: {res.executed} runs in {res.wall_s:.0f} s ({res.skipped} reused)", flush=True)
        frames.append(res.per_query[res.per_query["stage"] == "selected"])
    pq = pd.concat(frames, ignore_index=True)
    summarize(pq, load_config(config, [*base, "seed=0"]), metric, f"{args.task}{suffix}")


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recommended_overrides(path: str, config: str | None, base: list[str]) -> list[str]:
    """The overrides that turn the task's base config into ``recommended.yaml``: every key that differs, but the
    runner's, the data's (the split is the hand search's) and ``sft.checkpoint`` (each seed trains its own SFT)."""
    rec = _flat(yaml.safe_load(Path(path).read_text()))
    ref = _flat(to_dict(load_config(config, base)))
    skip = ("seed", "run_dir", "progress", "sft.checkpoint")
    return [
        f"{k}={json.dumps(v)}"
        for k, v in rec.items()
        if k not in skip and not k.startswith("data.") and ref.get(k, object()) != v
    ]


def summarize(pq: pd.DataFrame, cfg, metric: str, task: str) -> None:
    mat = {v: g.set_index(["seed", "query"])[metric].unstack("query").sort_index() for v, g in pq.groupby("variant")}
    sft = mat["sft"]
    refs = reference_outcomes(cfg, metric)
    rows, run_rows = [], []
    for v, m in mat.items():
        seeds = m.index.intersection(sft.index)
        d = (m.loc[seeds] - sft.loc[seeds]).to_numpy()
        lo, hi = bootstrap_mean_ci(d) if v != "sft" else (0.0, 0.0)
        rows.append(
            {
                "variant": v,
                "seeds": len(seeds),
                metric: m.to_numpy().mean(),
                "vs_sft": d.mean(),
                "lo": lo,
                "hi": hi,
                "per_seed": " ".join(f"{x:.4f}" for x in m.mean(axis=1)),
            }
        )
        run_rows += [{"variant": v, "seed": int(s), metric: float(m.loc[s].mean())} for s in m.index]
    for name, x in refs.items():  # the same test queries, in the same order as the runs' per-query columns
        d = x[None, :] - sft.to_numpy()
        lo, hi = bootstrap_mean_ci(d)
        rows.append(
            {"variant": name, "seeds": 0, metric: x.mean(), "vs_sft": d.mean(), "lo": lo, "hi": hi, "per_seed": ""}
        )
    table = pd.DataFrame(rows).sort_values("vs_sft", ascending=METRIC_DIRECTION[metric] < 0)
    dest = ROOT / "results_hand_search"
    dest.mkdir(exist_ok=True)
    table.to_csv(dest / f"{task}.csv", index=False, float_format="%.4f")
    pd.DataFrame(run_rows).to_csv(dest / f"{task}_runs.csv", index=False, float_format="%.4f")
    with pd.option_context("display.width", 200, "display.max_rows", 100):
        print(table.to_string(index=False, float_format=lambda x: f"{x:+.4f}"))


if __name__ == "__main__":
    sys.exit(main())
