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
# # 04 · Why GRPO underperforms
#
# The user's "optimised" v3 run (RCE 3 epochs + GRPO 8 epochs) did **worse** than the SFT model it started from, and
# the question is why: too little RCE, too little GRPO, or GRPO wrong for the task?
#
# This notebook answers with controlled comparisons instead of single runs. An **ablation grid**
# (`configs/ablate_default.yaml`) runs named variants of the seed configuration, each over several seeds, all
# starting from **one shared SFT checkpoint** per synthetic world, and reports every variant's effect on the held-out
# test set relative to SFT with a **95% bootstrap interval** (resampling both run seeds and test queries, paired with
# the same SFT model on the same queries). "Worse" below means the interval of the difference excludes 0.
#
# The synthetic world knows the truth: besides the label metric `acc@1` and the reward `reward@1`, every run reports
# `utility@1`, the hidden true utility of the top-ranked candidate. The reward is utility + noise + an exploitable
# style bias (`reward_bias`), so reward and label can disagree.
#
# Same grid from the command line (resumable; finished runs are skipped):
# ```
# v3kit ablate --grid configs/ablate_default.yaml --workers 2
# ```

# %% tags=["parameters"]
# Parameters (papermill: -p smoke True runs the tiny grid in well under a minute)
grid = "configs/ablate_default.yaml"  # relative to the cwd or to the repository root
smoke = False  # True: configs/ablate_smoke.yaml, one process
workers = 2  # parallel worker processes for the runs
out_dir = None  # default: runs/ablate/<grid name> in the repository
seed = 0  # bootstrap seed
n_boot = 2000  # bootstrap replicates

# %%
from IPython.display import display

from v3kit import ablate, diagnose
from v3kit.notebook import report_plots
from v3kit.notebook.plots import show
from v3kit.notebook.tools import record, resolve_run_dir

if smoke:
    grid, workers = "configs/ablate_smoke.yaml", 1
grid_path = ablate.find_grid(grid)
spec = ablate.load_grid(grid_path)
if out_dir is None:
    out_dir = resolve_run_dir(f"runs/ablate/{spec.name}")
print(f"grid {grid_path}: {len(spec.variants)} variants x {len(spec.seeds)} seeds"
      + (f", plus {len(spec.worlds.levels)} other worlds" if spec.worlds else "") + f"; results in {out_dir}")

# %% [markdown]
# ## 1 · Run the grid
#
# One SFT checkpoint per world, then every (variant, seed) run from it. A rerun only executes runs whose result
# file is missing or whose config changed.

# %%
res = ablate.run_grid(spec, out_dir, workers=workers)
summary = res.summary(n_boot=n_boot, seed=seed)
comparisons = ablate.compare(res.frame, res.per_query, spec.questions, n_boot=n_boot, seed=seed)
print(f"{res.executed} runs executed, {res.skipped} skipped, {res.wall_s:.0f} s")
base = summary[summary["world"] == ablate.BASE_WORLD]
print("mean, difference to SFT [95% CI], verdict")
display(ablate.summary_table(base))  # a rendered table: the text form wraps unreadably in a narrow Lab panel
print("\n".join(ablate.power_lines(base, list(ablate.summary_table(base).columns))))
record(runs_executed=res.executed, runs_skipped=res.skipped, variants=list(spec.variants))

# %% [markdown]
# ## 2 · Each variant's effect relative to SFT
#
# Points are the mean paired difference (variant's final model minus the shared SFT model on the same test queries),
# bars the 95% interval. Green / red: significantly better / worse; grey: the interval contains 0. Read the three
# panels together: a variant that raises `reward@1` while `utility@1` falls is optimising the reward's bias, not the
# task.

# %%
show(report_plots.forest_plot(summary))

# %% [markdown]
# The same, relative to the seed configuration (RCE 3 + GRPO 8) instead of SFT: which single change
# to the seed makes a significant difference?

# %%
show(report_plots.forest_plot(summary, against="reference"))

# %% [markdown]
# ## 3 · Where GRPO starts: the step-0 ratio
#
# The seed computes `old_log_probs` once from SFT, before RCE. After RCE the policy has moved, so GRPO's PPO ratio
# starts away from 1, and entries outside `[1 - eps, 1 + eps]` have their gradient clipped away before GRPO has
# learnt anything. Refreshing the old policy puts the ratio at exactly 1.

# %%
display(report_plots.step0_table(res.frame).round(3))

# %% [markdown]
# ## 4 · Training curves: the seed next to the best GRPO variant
#
# "Best" = the GRPO variant with the highest mean test `utility@1` on the default world (the hidden truth; chosen by
# the code, so it follows the numbers). Top: held-out validation metrics per epoch after SFT (mean over seeds, band =
# min..max), RCE first then GRPO. Bottom: per-step GRPO training logs of seed 0.

# %%
best = res.best or ablate.best_variant(res.frame, spec)
shown = [v for v in dict.fromkeys([spec.reference, best]) if v]
print("seed configuration:", spec.reference, f"| best GRPO variant by {ablate.best_metric(res.frame, spec)}:", best)
show(report_plots.curves_plot(res.frame, shown))
show(report_plots.train_curves_plot({v: res.run_dir(v) for v in shown}))

# %% [markdown]
# ## 5 · The doctor on the seed run
#
# `v3kit doctor RUN_DIR` reads a run's `metrics.csv` and checks the usual symptoms of a GRPO run gone wrong (step-0
# ratio, clipping, zero-std groups, KL, entropy, reward vs label, RCE convergence; see `docs/pipeline.md`), each with
# the number behind it and a switch to *test*: a single run's heuristics. `v3kit doctor RUN --grid` writes the grid
# that tests its suggestions against the run itself.

# %%
doctor = {}
for v in shown:
    findings = diagnose.diagnose(res.run_dir(v))
    doctor[v] = [f.check for f in findings if f.triggered]
    print(diagnose.format_report(findings, title=f"GRPO health report: {v}, seed {spec.seeds[0]} ({res.run_dir(v)})"))
    print()
record(doctor_flags=doctor)

# %% [markdown]
# ### Reward shortcut
#
# Within a group GRPO only sees the reward relative to the other candidates. Part of that may be paid whatever the
# query asked: ridge regression from the candidate's features alone (cross-fitted over folds of queries) predicts
# it. A large query-independent share means the policy can raise its reward without reading the query; in the
# synthetic worlds it is the style latent that `reward_bias` weights. (`v3kit doctor` reports the same per run,
# with the correlation of the policy's change from SFT with each part where the run kept its checkpoints.)

# %%
from v3kit.data import shortcut

shortcuts = shortcut.world_shortcuts(spec)
show(report_plots.shortcut_plot(shortcuts))
record(shortcut_share={w: round(a.explained_share, 4) for w, a in shortcuts.items()})
display(shortcut.shortcut_frame(shortcuts))

# %% [markdown]
# ## 6 · The user's proposed knobs: `kl_beta`, and GRPO epochs (the seed's 8 vs 25)
#
# Each point is a variant that changes only that key of the seed configuration (0 GRPO epochs = RCE only).

# %%
kl_variants = ablate.single_key_variants(spec, "grpo.kl_beta")
show(report_plots.sweep_plot(summary, spec, "grpo.kl_beta", kl_variants))
epoch_variants = ablate.single_key_variants(spec, "grpo.epochs")
show(report_plots.sweep_plot(summary, spec, "grpo.epochs", epoch_variants))
show(report_plots.curves_plot(res.frame, [v for v in epoch_variants if spec.value(v, "grpo.epochs") > 0],
                              stage="grpo", mark=spec.value(spec.reference, "grpo.epochs")))

# %% [markdown]
# ## 7 · Which world makes GRPO help or hurt
#
# The key comparison rerun in synthetic worlds that differ in one knob: `reward_bias` (how much the reward likes a
# style the true utility ignores, i.e. reward/label disagreement) and `reward_noise`. Each point is the variant's
# difference to that world's own SFT model; above 0 it helps, below it hurts.

# %%
if spec.worlds:
    show(report_plots.world_plot(summary, spec))
    display(ablate.summary_table(summary[summary["world"] != ablate.BASE_WORLD]))
else:
    print("this grid has no worlds section")

# %% [markdown]
# ## 8 · Conclusions (generated from the numbers above)
#
# Nothing below is hand-written: `ablate.conclusions` lists which variants are significantly better or worse than
# SFT and than the seed on each metric, answers the grid's questions with paired intervals, and summarises the
# worlds. Rerun the notebook and the text follows the new numbers.

# %%
text = ablate.conclusions(summary, comparisons=comparisons)
record(conclusions=text)
print(text)
