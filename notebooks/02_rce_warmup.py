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
# # 02 · Stage 2: RCE warm-up with an annealed temperature
#
# RCE (reward-weighted cross-entropy) pulls the policy towards a soft target built from the rewards:
#
# `t = label_weight * onehot(label) + (1 - label_weight) * softmax(rewards / T)`,
# `loss = -mean_b sum_c t[b, c] * log pi(c | q_b)`
#
# with `T` annealed linearly from `t_start` (2.0: soft targets, every beam counts) to `t_end` (0.5: targets
# concentrated on the best-reward beams) over all RCE steps. `temperature_target="logits"` applies `T` to the
# policy's logits instead (then GRPO's log-probs must use the same temperature; see suspect 5 in `docs/pipeline.md`).
#
# **Did the RCE loss really go down?** The loss is a cross-entropy, so it can never go below the entropy of its
# targets, `H(t)`. As `T` falls the targets sharpen and `H(t)` falls with them, so the raw loss drops *even if the
# policy learns nothing*. The part the policy controls is `loss - H(t) = KL(t || pi)`. The plots show both, and the
# plateau check below the plot compares the last steps with the ones before.
#
# The seed used lr 1e-5, which suits a large pretrained encoder; on this small synthetic ranker it barely moves
# anything, so the notebook defaults to 1e-4 (set `rce_lr = 1e-5` to reproduce the seed).

# %% tags=["parameters"]
smoke = False              # True: tiny sizes, the whole notebook runs in seconds (used by the tests)
run_dir = "runs/notebooks" # relative to the repository; shared: later notebooks reuse what earlier ones made
seed = 0
n_queries = None           # size of the synthetic world; None: 3000 (300 when smoke)
sft_epochs = None          # None: 15 (4 when smoke)
rce_epochs = None          # None: 3 as in the seed (2 when smoke)
rce_lr = 1e-4              # seed: 1e-5
t_start = 2.0
t_end = 0.5
temperature_target = "rewards"  # or "logits"
label_weight = 0.0         # mix of the human label into the targets
plateau_k = None           # steps per window of the plateau check; None: a quarter of the run
plateau_tol = 0.01         # relative change below which the loss counts as flat

# %%

from v3kit.diagnose import diagnose
from v3kit.doctor.rce_analysis import add_rce_floor, plateau_check, rce_floor
from v3kit.notebook.live import LivePlot
from v3kit.notebook.tools import notebook_config, record
from v3kit.run import Run
from v3kit.stage_reuse import ensure_rce, ensure_stage1

cfg = notebook_config(run_dir=run_dir, seed=seed, smoke=smoke, n_queries=n_queries, sft_epochs=sft_epochs,
                      rce_epochs=rce_epochs, rce_lr=rce_lr,
                      rce=dict(t_start=t_start, t_end=t_end, temperature_target=temperature_target,
                               label_weight=label_weight))
run = Run(cfg)  # the data, its splits, the device and threads: resolved once
splits = run.splits
stage1 = ensure_stage1(run)  # reuses notebook 01's sft.pt, or trains SFT if it is missing
record(sft_origin=stage1.origin)

# %% [markdown]
# ## RCE, live
#
# Top row: the loss with its floor `H(t)` (dashed), the loss above the floor, and the temperature schedule.
# Bottom row: held-out metrics after each epoch; the dashed line is the SFT model (epoch 0).

# %% tags=["plot"]
live = LivePlot(extras=rce_floor(splits.train, cfg.rce))
rce = ensure_rce(run, stage1=stage1, callbacks=[live], fresh=True)  # writes rce_epoch{N}.pt

# %%
h = add_rce_floor(rce.train_history, splits.train, cfg.rce)
raw = plateau_check(h["loss"], k=plateau_k, rel_tol=plateau_tol)
above_floor = plateau_check(h["excess_loss"], k=plateau_k, rel_tol=plateau_tol)
print("raw RCE loss:        ", raw)
print("loss - H(targets):   ", above_floor)
# The verdict is the doctor's rce_converged check (one home for "did RCE converge?"): how far RCE moved the policy
# and how much of its gap to the loss floor it closed, against the SFT policy's own gap at the same temperatures.
[verdict] = diagnose(rce.history, cfg, splits=splits, sft=(stage1.reference, stage1.model_config.sim_temperature),
                     only=["rce_converged"])
print("=>", ("⚠ " if verdict.triggered else "✔ ") + verdict.message + (f" -> test: {verdict.suggestion}"
                                                                       if verdict.triggered else ""))
record(rce_raw_loss=raw.status, rce_excess_loss=above_floor.status, rce_converged=verdict.triggered)

# %% [markdown]
# ## Held-out metrics per epoch
#
# Epoch 0 is the SFT model. RCE optimises towards the rewards, so `reward@1` should rise; watch whether `acc@1`
# (the human label) and `utility@1` (the truth) follow or fall, and how far the policy drifts (`kl_to_sft`).

# %%
cols = [c for c in ("epoch", "acc@1", "mrr", "reward@1", "utility@1", "kl_to_sft", "entropy") if c in rce.eval_history]
rce.eval_history[cols].set_index("epoch").round(4)

# %% [markdown]
# Next: `03_grpo` starts GRPO from the last `rce_epoch{N}.pt` in `run_dir`.
