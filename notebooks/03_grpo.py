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
# # 03 · Stage 3: GRPO, live, and a kl_beta comparison
#
# Each training group is one query with its candidates; the seed treats every candidate as a sample:
#
# ```
# A     = (r - mean_group r) / (std_group r + eps)          # group-relative advantage
# ratio = exp(logp - old_logp)                              # old_logp: stage 1's SFT log-probs (seed)
# pg    = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
# kl    = ratio - 1 - log(ratio)        (kl_reference="old", seed)
#         exp(ref - logp) - (ref - logp) - 1   (kl_reference="sft": k3 against the frozen SFT copy)
# loss  = mean over valid candidates of (pg + kl_beta * kl)
# ```
#
# **What to look for:** with the seed's `old_policy="sft"`, the ratio at GRPO's first step is not 1, because RCE
# has already moved the policy away from SFT: the histogram below shows how much of it falls outside the clip
# range (those entries get no gradient when the advantage points further out). `clip_ratio` stays high if so.
# `kl` against the old policy measures drift from SFT only while the old policy *is* SFT. The held-out panels
# show whether reward rises at the cost of the label (`acc@1`) and of the truth (`utility@1`).
#
# `old_policy="refresh_at_start"` / `"refresh_each_epoch"` recompute `old_logp` from the current policy (as PPO does);
# `kl_reference="sft"` keeps the KL anchored to SFT. The panel at the end compares settings side by side.

# %% tags=["parameters"]
smoke = False              # True: tiny sizes, the whole notebook runs in seconds (used by the tests)
run_dir = "runs/notebooks" # relative to the repository; shared: later notebooks reuse what earlier ones made
seed = 0
n_queries = None           # size of the synthetic world; None: 3000 (300 when smoke)
sft_epochs = None          # None: 15 (4 when smoke)
rce_epochs = None          # must match notebook 02 to reuse its RCE output
rce_lr = 1e-4
grpo_epochs = None         # None: 8 as in the seed (2 when smoke)
grpo_lr = 1e-4             # seed: 1e-5
kl_beta = 0.1
eps_low = 0.2
eps_high = None            # None: eps_low
old_policy = "sft"         # "sft" (seed) | "refresh_at_start" | "refresh_each_epoch"
kl_reference = "old"       # "old" (seed) | "sft"
kl_betas = [0.0, 0.01, 0.1, 0.5]  # the comparison the panel runs without clicks
compare_epochs = None      # epochs per comparison run; None: grpo_epochs

# %%
import copy

from v3kit.notebook.grpo_panel import ComparePanel, GRPOStart
from v3kit.notebook.live import LivePlot
from v3kit.notebook.plots import grpo_panels, plot_ratio_hist, show
from v3kit.notebook.tools import notebook_config, record
from v3kit.pipeline import stage_table
from v3kit.run import Run
from v3kit.stage_reuse import ensure_rce, ensure_stage1
from v3kit.train.sft import sft_baseline

cfg = notebook_config(run_dir=run_dir, seed=seed, smoke=smoke, n_queries=n_queries, sft_epochs=sft_epochs,
                      rce_epochs=rce_epochs, rce_lr=rce_lr, grpo_epochs=grpo_epochs, grpo_lr=grpo_lr,
                      grpo=dict(kl_beta=kl_beta, eps_low=eps_low, eps_high=eps_high, old_policy=old_policy,
                                kl_reference=kl_reference))
run = Run(cfg)                  # the data, its splits, the device and threads: resolved once
splits = run.splits
stage1 = ensure_stage1(run)      # notebook 01's sft.pt, or train SFT
rce = ensure_rce(run, stage1=stage1)  # notebook 02's rce_epoch{N}.pt, or train RCE
record(sft_origin=stage1.origin, rce_origin=rce.info["origin"])

# %% [markdown]
# ## GRPO, live
#
# Per step: loss, `pg_loss`, `kl`, the ratio (mean, with the per-batch min..max as a band and the clip range
# dotted), `clip_ratio`, entropy. Per epoch: held-out metrics, with the SFT model dashed (epoch 0 = after RCE).

# %% tags=["plot"]
live = LivePlot(grpo_panels(cfg.grpo.eps_low, cfg.grpo.eps_high), baseline=sft_baseline(stage1, splits.val))
grpo = run.grpo(stage1, policy=copy.deepcopy(rce.model), context={"callbacks": [live], "progress": False})
# grpo_epoch{N}.pt are now in run_dir

# %% [markdown]
# ## The ratio at GRPO step 0
#
# Every valid `pi_theta / pi_old` on the training set before the first update. With `old_policy="sft"` after RCE
# this is the distance RCE travelled; with a refreshed old policy it is exactly 1.

# %% tags=["plot"]
show(plot_ratio_hist(grpo.info["step0_ratios"], cfg.grpo.eps_low, cfg.grpo.eps_high))

# %% [markdown]
# ## SFT vs RCE vs GRPO on the test split

# %%
table = stage_table({"sft": stage1.reference, "rce": rce.model, "grpo": grpo.model}, splits.test,
                    stage1.reference, stage1.model_config.sim_temperature)
record(stage_table=table.to_dict("index"))
table.round(4)

# %% [markdown]
# ## Compare settings
#
# Every run starts from the same post-RCE policy, stage-1 `old_log_probs` and seed; only GRPO trains. Move the
# sliders and press **Run GRPO**: the run is added to the overlay (one colour per run, the legend names what
# differs) and to the table of final held-out metrics. The cell after it runs `kl_betas` through the same code, so
# the executed notebook has the comparison even with nobody clicking.

# %%
panel = ComparePanel(GRPOStart.from_run(run, stage1, rce.model))
if compare_epochs is not None:
    panel.set(epochs=compare_epochs)
panel.widget

# %% tags=["plot"]
panel.run_grid(kl_beta=kl_betas)
record(panel_runs=len(panel.table), panel_settings=[run.settings["kl_beta"] for run in panel.runs])
show(panel.figure)
panel.table.round(4)
