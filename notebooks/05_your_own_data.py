# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python (v3kit)
#     language: python
#     name: v3kit
# ---

# %% [markdown]
# # 05 · Your own data and your own v2 model
#
# Notebooks 01–04 use the synthetic world, which knows the true utility of every candidate. Your data does not.
# This notebook walks through the v3 pipeline with **your table** and **your v2 checkpoint**, end to end:
#
# 1. point at the table, look at its schema, and measure how often the reward agrees with the human label;
# 2. import your v2 ranker (your class, your `state_dict` file) as v3kit's SFT checkpoint;
# 3. run RCE and GRPO from it, live, and compare the stages on the held-out test split;
# 4. run the doctor on the run and write the ablation grid that tests its suggestions;
# 5. run that grid (several seeds, one shared SFT: yours) and read its bootstrap intervals;
# 6. get the verdict: which model to ship (SFT, RCE only, or a remedy), with the config that trains it.
#
# By default everything runs on a real-text example that ships with v3kit: **code search over the Python standard
# library** (`builtin:stdlib_search`, `configs/stdlib_search.yaml`). Each query is a function's docstring summary;
# its candidates are the function itself and 7 BM25 hard negatives (text: name, signature, rest of the docstring);
# the reward is an imperfect lexical-overlap reward model with a bias for long docstrings; the label is the true
# function. The texts are embedded once by a frozen MiniLM encoder (cached on disk, keyed by text) and the towers
# train on the 384-d vectors. The stand-in for "your v2" is `examples/my_ranker/`: a class written without v3kit
# (`models.py`) and a plain PyTorch training script that saves a wrapped `state_dict` (`train_v2.py`).
#
# **To use your own:** set `data_path` to your Parquet, Arrow IPC / Feather or JSONL table (schema in the README, "Data schema"), `config`
# to a config for it (or keep the stdlib one: its model/RCE/GRPO settings suit cosine-scored text towers),
# `v2_state_dict` to your weights file and `v2_target` to your class (`path/to/models.py:Class` or
# `pkg.module:Class`). `v2_target = None` lets v3kit train its own SFT model instead.

# %% tags=["parameters"]
smoke = False                  # True: tiny sizes, the whole notebook runs in well under a minute (used by the tests)
run_dir = "runs/notebooks05"   # relative to the repository
seed = 0
data_path = "builtin:stdlib_search"  # or path/to/your_table.parquet | .jsonl (relative: to the repository)
config = "configs/stdlib_search.yaml"  # the run's settings; data_path and the sizes below override it
max_queries = None             # size of the built-in table; None: the config's 2000 (60 when smoke)
v2_target = "examples/my_ranker/models.py:MyTwoTower"  # your ranker class; None: v3kit trains its own SFT model
v2_state_dict = None           # your v2 weights file; None: examples/my_ranker/train_v2.py trains MyTwoTower now
v2_kwargs = {}                 # constructor arguments of v2_target beyond query_dim / cand_dim
v2_sim_temperature = 1.0       # logit temperature of your scores (MyTwoTower: raw dot products, 1.0)
v2_epochs = None               # epochs of the stand-in training script; None: 10 (30 when smoke)
sft_epochs = None              # only when v2_target is None; None: the config's (3 when smoke)
rce_epochs = None              # None: the config's (2 when smoke)
grpo_epochs = None             # None: the config's (2 when smoke)
ablation_seeds = None          # seeds per variant of the doctor's grid; None: 3 (2 when smoke)
workers = 1                    # parallel processes for the ablation runs
n_boot = 1000                  # bootstrap replicates of the ablation summary
verdict_minutes = 15           # budget of section 6's investigation: its search and confirm phases together

# %%
import subprocess
import sys

import pandas as pd
from IPython.display import display

from v3kit import ablate, diagnose
from v3kit.config import load_config, resolve_config_file
from v3kit.data.stdlib_search import reward_label_agreement
from v3kit.doctor.grid import write_doctor_grid
from v3kit.notebook import report_plots
from v3kit.notebook.live import LivePlot
from v3kit.notebook.plots import show
from v3kit.notebook.tools import record, resolve_path, resolve_run_dir, resolve_target
from v3kit.pipeline import load_table, prepare_data, run_pipeline
from v3kit.train.import_sft import import_sft

SMALL = dict(max_queries=60, v2_epochs=30, sft_epochs=3, rce_epochs=2, grpo_epochs=2, ablation_seeds=2)


def size(value, name, default=None):
    """The parameter if given, else the smoke size when smoke, else ``default`` (None: the config's)."""
    return value if value is not None else SMALL[name] if smoke else default


run_dir = resolve_run_dir(run_dir)
builtin = str(data_path).startswith("builtin:")
overrides = [f"data.path={data_path if builtin else resolve_path(data_path)}", f"seed={seed}",
             f"run_dir={run_dir}", "progress=false"]
for key, value in (("data.stdlib_search.max_queries", size(max_queries, "max_queries") if builtin else None),
                   ("sft.epochs", size(sft_epochs, "sft_epochs")), ("rce.epochs", size(rce_epochs, "rce_epochs")),
                   ("grpo.epochs", size(grpo_epochs, "grpo_epochs"))):
    if value is not None:
        overrides.append(f"{key}={value}")
config_file = resolve_config_file(config).resolve()
cfg = load_config(config_file, overrides)
print(f"config {config_file}\n  + " + "\n  + ".join(overrides))

# %% [markdown]
# ## 1 · The table
#
# One row per query–candidate pair: `query_id`, `candidate_id`, `reward`, `is_label` (exactly one per query), and
# for each side its features or its text (`query_text` / `candidate_text`). The built-in table is built from this
# Python's own docstrings on first use and cached under `data.cache_dir` (default `~/.cache/v3kit`, or
# `$V3KIT_CACHE_DIR`).
#
# **Reward–label agreement** is the share of queries whose highest-reward candidate is the labelled one. RCE and
# GRPO optimise the reward; the label metrics (`acc@1`, `mrr`) are how you judge the result on real data (there is
# no hidden true utility, so no `utility@1`). When agreement is low, a rising `reward@1` with a falling `acc@1` is
# the reward being optimised *instead of* the task; the doctor's `reward_vs_label` check looks for exactly that.

# %%
table = load_table(cfg)
shown_cols = [c for c in ("query_id", "query_text", "candidate_id", "candidate_text", "reward", "is_label")
              if c in table.columns]
groups = table.groupby("query_id", sort=False).size()
agreement = reward_label_agreement(table)
print(f"{len(table)} rows, {len(groups)} queries, {groups.min()}-{groups.max()} candidates per query")
print(f"reward-label agreement: the top-reward candidate is the label in {agreement:.1%} of queries")
display(table.dtypes.astype(str).rename("dtype").to_frame())
with pd.option_context("display.max_colwidth", 70):
    display(table[shown_cols].head(8))
record(agreement=round(agreement, 4), n_queries=int(len(groups)), columns=list(table.columns))

# %% [markdown]
# Splitting is by query (`data.val_frac`, `data.test_frac`, seeded by `seed`); texts without feature vectors are
# embedded here (once: later runs read the cache).

# %%
splits = prepare_data(cfg)
dims = dict(query_dim=splits.train.query_dim, cand_dim=splits.train.cand_dim)
print(f"train / val / test queries: {len(splits.train)} / {len(splits.val)} / {len(splits.test)}; feature dims {dims}")

# %% [markdown]
# ## 2 · Your v2 model as the SFT checkpoint
#
# v3kit needs your class (two towers, or a scorer whose `forward(query_x, cand_x)` returns scores [B, G]; any
# method names and constructor: see `docs/your_model.md`) and its weights as saved by
# `torch.save(model.state_dict(), ...)`, wrapped or not.
# `import_sft` builds the class, unwraps the file (`{"model": ...}`, a `module.` prefix, ...), refuses weights that
# do not fit (listing every mismatched key, writing nothing) and writes a v3kit SFT checkpoint. Same from a shell:
#
# ```
# v3kit import-sft --target examples/my_ranker/models.py:MyTwoTower --state-dict v2.pt \
#     --config configs/stdlib_search.yaml --out sft.pt
# ```
#
# With `v2_state_dict = None` the example's training script stands in for yours: it trains `MyTwoTower` on the
# same training split (a plain PyTorch loop, nothing from v3kit in the model) and saves a DataParallel-style
# wrapped `state_dict`.

# %%
sft_checkpoint = None
if v2_target is not None:
    if v2_state_dict is None:
        v2_state_dict = run_dir / "v2" / "v2.pt"
        script = resolve_path("examples/my_ranker/train_v2.py")
        cmd = [sys.executable, str(script), "--config", str(config_file), "--out", str(v2_state_dict),
               "--epochs", str(size(v2_epochs, "v2_epochs", 10)), *[a for o in overrides for a in ("--set", o)]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{script.name} failed:\n{proc.stderr[-3000:]}")
        print(proc.stdout.strip())
    sft_checkpoint = import_sft(resolve_target(v2_target), resolve_path(v2_state_dict), run_dir / "v2" / "sft.pt",
                                kwargs=v2_kwargs, sim_temperature=v2_sim_temperature, model_config=cfg.model, **dims)
    print(f"imported {v2_target} with the weights of {v2_state_dict} -> {sft_checkpoint}")
else:
    print(f"v2_target is None: v3kit trains its own SFT model ({cfg.model.target}, {cfg.sft.epochs} epochs)")
record(sft_origin="imported" if sft_checkpoint else "trained")

# %% [markdown]
# ## 3 · RCE and GRPO from your model, live
#
# `run_pipeline` runs every stage in `run_dir` (SFT only when no checkpoint is given): stage 1 freezes a copy of
# the SFT model and computes `old_log_probs`, then RCE, then GRPO. One figure per stage: per-step training logs
# and, per epoch, the held-out validation metrics with the starting model dashed (epoch 0).

# %% tags=["plot"]
live = LivePlot()
result = run_pipeline(cfg, sft_checkpoint=sft_checkpoint, splits=splits, callbacks=[live])

# %% [markdown]
# Held-out **test** metrics of the three stages (every stage scored at the model's own logit temperature, so
# `entropy` and `kl_to_sft` compare like with like). Real data has no true utility, hence no `utility@1` column:
# `acc@1` / `mrr` / `ndcg@5` measure the label, `reward@1` the reward model.

# %%
record(stage_table=result.table.to_dict("index"))
result.table.round(4)

# %% [markdown]
# ## 4 · The doctor
#
# `v3kit doctor RUN_DIR` reads the run's `metrics.csv` and `config.yaml` (and rebuilds the data from it) and runs
# its checks: step-0 ratio, clipping, zero-std groups, KL, entropy, reward vs label, RCE convergence, the reward's
# query-independent shortcut, RCE target sharpness, and SFT against trivial rankers (random, raw cosine, the
# reward's own argmax). Each flagged check names a switch to **test**, not to adopt: one run is a hypothesis.

# %%
findings = diagnose.diagnose(run_dir)
print(diagnose.format_report(findings, title=f"GRPO health report: {run_dir}", run=run_dir))
record(doctor_flags=[f.check for f in findings if f.triggered], doctor_checks=[f.check for f in findings])

# %% [markdown]
# `v3kit doctor RUN_DIR --grid` turns the suggestions into an ablation grid: `base` = this run's config, variants
# = the run itself (`run`, the reference), `sft_only` and one variant per suggested switch, each with the
# question it answers, all starting from this run's SFT checkpoint (your imported model).

# %%
n_seeds = size(ablation_seeds, "ablation_seeds", 3)
grid_path = write_doctor_grid(run_dir, findings, n_seeds=n_seeds)
print(grid_path.read_text())
record(grid_path=str(grid_path))

# %% [markdown]
# ## 5 · Test the suggestions: the ablation
#
# Every (variant, seed) run starts from the same SFT model; each variant's effect is reported on the test split
# relative to SFT with a 95% bootstrap interval over seeds and test queries, and the grid's questions are answered
# with paired intervals against `run`. Same from a shell (resumable; finished runs are skipped):
# `v3kit ablate --grid RUN_DIR/doctor_grid.yaml`. The power lines say how small an effect this test split and
# these seeds can detect: with a small table, "n.s." often means "too few queries to tell".

# %%
spec = ablate.load_grid(grid_path)
grid = ablate.run_grid(spec, run_dir / "ablation", workers=workers, progress=False)
summary = grid.summary(n_boot=n_boot, seed=seed)
comparisons = ablate.compare(grid.frame, grid.per_query, spec.questions, n_boot=n_boot, seed=seed)
print(f"{grid.executed} runs executed, {grid.skipped} skipped, {grid.wall_s:.0f} s")
print(ablate.format_summary(summary))
record(ablation_variants=list(dict.fromkeys(summary["variant"])), ablation_runs=grid.executed + grid.skipped)

# %% tags=["plot"]
show(report_plots.forest_plot(summary))

# %%
text = ablate.conclusions(summary, comparisons=comparisons)
record(conclusions=text)
print(text)

# %% [markdown]
# ## 6 · The verdict: what to ship
#
# The ablation above tests one switch at a time against the run. `v3kit investigate RUN_DIR` looks for what to
# ship, on two separate splits. Its **search** is an Optuna study over the declared search space
# (`configs/search_space.yaml`: the RCE and GRPO settings, the reward's de-biasing, and, when the kit trains the
# SFT, the SFT and the model's scoring head): single-seed trials scored on **val**, pruned epoch by epoch, the
# doctor's flagged switches and remedies first. Its **confirm** phase retrains the top configurations, the run, the
# SFT you have and every shippable reference with fresh seeds and compares them on **test**, which the search never
# saw, with Holm's correction over the comparisons. Every trial ships its best val epoch (`select: best_val`, the
# stage's start included), so a configuration that hurts falls back to where it started. The recommended config
# trains as is: `v3kit run --config RUN_DIR/investigate/recommended.yaml`.

# %%
from IPython.display import Markdown

from v3kit.doctor.investigate import investigate

verdict = investigate(run_dir, metric="acc@1", out=run_dir / "investigate", budget_minutes=verdict_minutes,
                      workers=workers, max_trials=4 if smoke else 200, top_k=1 if smoke else 3,
                      confirm_seeds=2 if smoke else 3, progress=False)
record(verdict={k: verdict.as_json()[k] for k in ("recommendation", "variant", "config", "effect_vs_sft",
                                                  "effect_vs_run", "metric", "sentence", "search")})
display(Markdown((run_dir / "investigate" / "verdict.md").read_text().split("\n![")[0]))

# %% tags=["plot"]
from IPython.display import Image

for name in ("effects.png", "search_history.png", "search_importances.png"):  # the figures verdict.md shows
    if (run_dir / "investigate" / name).exists():
        display(Image(filename=str(run_dir / "investigate" / name)))
