"""Seeded ablations of the v3 pipeline: named variants x seeds (x synthetic worlds), with bootstrap intervals.

Modules: ``grid`` (the spec), ``runner`` (planning, resuming, collecting), ``worker`` (what a worker runs: an SFT,
a run or a stack, and its ``result.json``), ``backends`` (where the tasks run: local processes or Ray), ``stats``
(intervals), ``report`` (tables and generated conclusions), ``cli`` (``v3kit ablate``).

The ablation floor sits on the run config and pipeline: it may import them and every floor below (the training
stages, the data, the infrastructure), never the doctor or the notebook helpers, which build on it
(``tests/test_layout.py`` checks it).

A *grid* (YAML) names variants, each a list of ``key=value`` config overrides applied on top of ``base``::

    config: null                  # optional base config file (default: the seed settings)
    base: [data.synthetic.n_queries=3000]
    seeds: [0, 1, 2]
    reference: seed               # the variant "vs the seed" compares with
    variants:
      sft_only: [rce.epochs=0, grpo.epochs=0]
      seed: []
      old_refresh_start: [grpo.old_policy=refresh_at_start]
    sft_checkpoint: null          # optional: start every base-world run from this SFT checkpoint (no SFT training)
    questions:                    # optional: named pairwise comparisons the conclusions answer
      "More RCE (10 epochs) before GRPO?": [rce10_grpo8, seed]
    worlds:                       # optional: rerun a few variants in other synthetic worlds
      seeds: [0, 1, 2]
      variants: [sft_only, seed, "@best"]   # @best: the best GRPO variant of the base world on best_metric
      best_metric: utility@1
      levels:
        bias_0: [data.synthetic.reward_bias=0.0]

Design choices (why):

* **One SFT checkpoint per world**, trained once with ``sft_seed`` and reused by every variant and seed, so a
  difference between variants is never a difference between SFT models. The train/val/test split is the SFT's
  (``split_by_query`` with ``sft_seed``) for every run, otherwise a run seed would move SFT training queries into
  its test set. Run seeds therefore vary only what happens after SFT (batch order, sampling). Variants may not
  touch ``data``/``model``/``sft`` (that would need another SFT); worlds may.
* **Uncertainty** (see :func:`summarize`): a two-level bootstrap over run seeds *and* test queries, on per-query
  outcomes paired with the same SFT model on the same queries. Seeds alone (3-5 values) ignore that the test set is
  a sample; queries alone ignore training noise. Both are resampled, so "worse than SFT" means the interval of the
  paired difference excludes 0.
* **Resumable**: every finished run writes ``result.json`` atomically (temp file + ``os.replace``) together with a
  hash of its resolved config; a rerun skips runs whose file exists with the same hash and reruns changed ones.
"""

from .cli import cmd_ablate, register_cli
from .grid import (
    BASE_WORLD,
    BEST,
    KEY_METRICS,
    METRIC_DIRECTION,
    PER_QUERY_METRICS,
    GridError,
    GridSpec,
    WorldSweep,
    find_grid,
    load_grid,
    parse_grid,
    single_key_variants,
)
from .report import conclusions, format_summary, power_lines, summary_table
from .runner import GridResult, best_metric, best_variant, collect, run_grid
from .stats import MIN_RUNS_FOR_SEEDS_ONLY_VERDICT, bootstrap_mean_ci, compare, min_detectable_effect, summarize
from .worker import per_query_outcomes

__all__ = [
    "BASE_WORLD",
    "BEST",
    "KEY_METRICS",
    "METRIC_DIRECTION",
    "MIN_RUNS_FOR_SEEDS_ONLY_VERDICT",
    "PER_QUERY_METRICS",
    "GridError",
    "GridResult",
    "GridSpec",
    "WorldSweep",
    "best_metric",
    "best_variant",
    "bootstrap_mean_ci",
    "cmd_ablate",
    "collect",
    "compare",
    "conclusions",
    "find_grid",
    "format_summary",
    "power_lines",
    "summary_table",
    "load_grid",
    "parse_grid",
    "per_query_outcomes",
    "min_detectable_effect",
    "register_cli",
    "run_grid",
    "single_key_variants",
    "summarize",
]
