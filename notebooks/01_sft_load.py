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
# # 01 · Stage 1: the SFT ("v2") checkpoint, its frozen copy and `old_log_probs`
#
# The v3 pipeline starts from the supervised ranker. Stage 1 does three things:
#
# 1. **load** the SFT checkpoint (or train one on the synthetic world when `sft_checkpoint` is `None`);
# 2. keep a **frozen copy** of it: the reference for `kl_to_sft` and for `kl_reference="sft"` in GRPO;
# 3. compute **`old_log_probs`** on the training groups once:
#    `old_logp[b, c] = log softmax_c(sim(q_b, c) / T)` over each group's real candidates.
#
# The seed's GRPO uses these SFT log-probs as its "old policy" for every epoch, even after RCE has moved the
# policy. Notebook 03 shows what that does to the PPO ratio.
#
# **What to look for here:** how peaked the SFT policy already is (a label far above the uniform line means the
# policy is confident), how much the rewards vary within a group (GRPO divides by that spread; groups without
# spread carry no signal), and how often the human label is the highest-reward candidate: when reward and label
# disagree, maximising reward can lower `acc@1` even while the ranker gets "better" by the reward.

# %% tags=["parameters"]
smoke = False              # True: tiny sizes, the whole notebook runs in seconds (used by the tests)
run_dir = "runs/notebooks" # relative to the repository; shared: later notebooks reuse what earlier ones made
seed = 0
n_queries = None           # size of the synthetic world; None: 3000 (300 when smoke)
sft_epochs = None          # None: 15 (4 when smoke)
sft_checkpoint = None      # path of your own v2 checkpoint (a v3kit sft.pt); None: train one

# %%
import pandas as pd

from v3kit.data.reward_stats import stage1_summary
from v3kit.notebook.live import LivePlot
from v3kit.notebook.plots import plot_stage1, show
from v3kit.notebook.tools import notebook_config, record
from v3kit.run import Run
from v3kit.stage_reuse import ensure_stage1
from v3kit.train.sft import sft_baseline

cfg = notebook_config(run_dir=run_dir, seed=seed, smoke=smoke, n_queries=n_queries, sft_epochs=sft_epochs)
run = Run(cfg)  # the data, its splits, the device and threads: resolved once, as `v3kit run` does
splits = run.splits
print(f"{len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test groups, "
      f"up to {splits.train.group_size} candidates each; run dir {cfg.run_dir}")

# %% [markdown]
# ## SFT: train, reuse or load
#
# SFT is cross-entropy on the human label, `-log pi(label | q)`. The plot updates while it trains. If an earlier
# run of this notebook left `sft.pt` in `run_dir` with the same settings, it is reused and the logged curves are
# shown instead.

# %% tags=["plot"]
live = LivePlot(stages=["sft"])
stage1 = ensure_stage1(run, sft_checkpoint=sft_checkpoint, callbacks=[live])
live.finish(cfg.run_dir)  # if SFT was reused: show its logged curves
record(sft_origin=stage1.origin)

# %% [markdown]
# ## The SFT baseline
#
# Held-out (validation) metrics of the SFT model: every later stage is compared against this row.
# `acc@1` and `mrr` measure agreement with the human label, `reward@1` / `regret@1` the reward of the top-ranked
# candidate, `utility@1` the hidden true utility (synthetic world only).

# %%
baseline = sft_baseline(stage1, splits.val)
record(sft_val=baseline)
pd.DataFrame([baseline], index=["SFT (val)"]).round(4)

# %% [markdown]
# ## What stage 1 hands to RCE and GRPO
#
# Left: the distribution of `old_log_probs` over all training candidates and over the labelled ones.
# Middle: the per-group standard deviation of the rewards (GRPO's advantage divides by it).
# Right: where the human label ranks by reward inside its group; rank 1 means label and reward agree.

# %% tags=["plot"]
show(plot_stage1(stage1.old_log_probs, splits.train))
summary = stage1_summary(stage1.old_log_probs, splits.train)
record(stage1=summary)
pd.Series(summary).round(4).to_frame("stage 1")

# %% [markdown]
# Next: `02_rce_warmup` trains RCE from this checkpoint (it reuses `sft.pt` from `run_dir`).
