"""Generate the three notebooks (stripped: no outputs, no execution counts). Run: python notebooks/_build.py

Cells tagged ``plot`` must show at least one PNG when executed (tests/test_notebooks.py checks it).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent


def md(text: str) -> tuple[str, str, tuple[str, ...]]:
    return ("md", text.strip(), ())


def code(text: str, *tags: str) -> tuple[str, str, tuple[str, ...]]:
    return ("code", text.strip(), tags)


def build(name: str, cells: list[tuple[str, str, tuple[str, ...]]], out_dir: Path = HERE) -> Path:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, text, tags) in enumerate(cells):
        cell = new_markdown_cell(text) if kind == "md" else new_code_cell(text)
        cell["id"] = f"{name[:2]}-{i:02d}"  # stable ids: regenerating gives the same file
        if tags:
            cell.metadata["tags"] = list(tags)
        nb.cells.append(cell)
    path = Path(out_dir) / f"{name}.ipynb"
    nbformat.write(nb, str(path))
    return path


SHARED_PARAMS = '''
smoke = False              # True: tiny sizes, the whole notebook runs in seconds (used by the tests)
run_dir = "runs/notebooks" # shared by the three notebooks: later ones reuse what earlier ones made
seed = 0
n_queries = None           # size of the synthetic world; None: 3000 (300 when smoke)
sft_epochs = None          # None: 15 (4 when smoke)
'''

NB01 = [
    md('''
# 01 · Stage 1: the SFT ("v2") checkpoint, its frozen copy and `old_log_probs`

The v3 pipeline starts from the supervised ranker. Stage 1 does three things:

1. **load** the SFT checkpoint (or train one on the synthetic world when `sft_checkpoint` is `None`);
2. keep a **frozen copy** of it: the reference for `kl_to_sft` and for `kl_reference="sft"` in GRPO;
3. compute **`old_log_probs`** on the training groups once:
   `old_logp[b, c] = log softmax_c(sim(q_b, c) / T)` over each group's real candidates.

The seed's GRPO uses these SFT log-probs as its "old policy" for every epoch, even after RCE has moved the
policy. Notebook 03 shows what that does to the PPO ratio.

**What to look for here:** how peaked the SFT policy already is (a label far above the uniform line means the
policy is confident), how much the rewards vary within a group (GRPO divides by that spread; groups without
spread carry no signal), and how often the human label is the highest-reward candidate: when reward and label
disagree, maximising reward can lower `acc@1` even while the ranker gets "better" by the reward.
'''),
    code(SHARED_PARAMS + 'sft_checkpoint = None      # path of your own v2 checkpoint (a v3kit sft.pt); None: train one\n',
         "parameters"),
    code('''
import pandas as pd

from v3kit.live import LivePlot, plot_stage1, show, stage1_summary
from v3kit.notebook_tools import ensure_stage1, notebook_config
from v3kit.pipeline import prepare_data
from v3kit.sft import sft_baseline

cfg = notebook_config(run_dir=run_dir, seed=seed, smoke=smoke, n_queries=n_queries, sft_epochs=sft_epochs)
splits = prepare_data(cfg)
print(f"{len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test groups, "
      f"up to {splits.train.group_size} candidates each; run dir {cfg.run_dir}")
'''),
    md('''
## SFT: train, reuse or load

SFT is cross-entropy on the human label, `-log pi(label | q)`. The plot updates while it trains. If an earlier
run of this notebook left `sft.pt` in `run_dir` with the same settings, it is reused and the logged curves are
shown instead.
'''),
    code('''
live = LivePlot(stages=["sft"])
stage1 = ensure_stage1(cfg, splits, sft_checkpoint=sft_checkpoint, callbacks=[live])
live.finish(cfg.run_dir)  # if SFT was reused: show its logged curves
''', "plot"),
    md('''
## The SFT baseline

Held-out (validation) metrics of the SFT model: every later stage is compared against this row.
`acc@1` and `mrr` measure agreement with the human label, `reward@1` / `regret@1` the reward of the top-ranked
candidate, `utility@1` the hidden true utility (synthetic world only).
'''),
    code('''
baseline = sft_baseline(stage1, splits.val)
pd.DataFrame([baseline], index=["SFT (val)"]).round(4)
'''),
    md('''
## What stage 1 hands to RCE and GRPO

Left: the distribution of `old_log_probs` over all training candidates and over the labelled ones.
Middle: the per-group standard deviation of the rewards (GRPO's advantage divides by it).
Right: where the human label ranks by reward inside its group; rank 1 means label and reward agree.
'''),
    code('''
show(plot_stage1(stage1.old_log_probs, splits.train))
pd.Series(stage1_summary(stage1.old_log_probs, splits.train)).round(4).to_frame("stage 1")
''', "plot"),
    md('''
Next: `02_rce_warmup.ipynb` trains RCE from this checkpoint (it reuses `sft.pt` from `run_dir`).
'''),
]

NB02 = [
    md('''
# 02 · Stage 2: RCE warm-up with an annealed temperature

RCE (reward-weighted cross-entropy) pulls the policy towards a soft target built from the rewards:

`t = label_weight * onehot(label) + (1 - label_weight) * softmax(rewards / T)`,
`loss = -mean_b sum_c t[b, c] * log pi(c | q_b)`

with `T` annealed linearly from `t_start` (2.0: soft targets, every beam counts) to `t_end` (0.5: targets
concentrated on the best-reward beams) over all RCE steps. `temperature_target="logits"` applies `T` to the
policy's logits instead (then GRPO's log-probs must use the same temperature; see DESIGN.md suspect 5).

**Did the RCE loss really go down?** The loss is a cross-entropy, so it can never go below the entropy of its
targets, `H(t)`. As `T` falls the targets sharpen and `H(t)` falls with them, so the raw loss drops *even if the
policy learns nothing*. The part the policy controls is `loss - H(t) = KL(t || pi)`. The plots show both, and the
plateau check below the plot compares the last steps with the ones before.

The seed used lr 1e-5, which suits a large pretrained encoder; on this small synthetic ranker it barely moves
anything, so the notebook defaults to 1e-4 (set `rce_lr = 1e-5` to reproduce the seed).
'''),
    code(SHARED_PARAMS + '''rce_epochs = None          # None: 3 as in the seed (2 when smoke)
rce_lr = 1e-4              # seed: 1e-5
t_start = 2.0
t_end = 0.5
temperature_target = "rewards"  # or "logits"
label_weight = 0.0         # mix of the human label into the targets
plateau_k = None           # steps per window of the plateau check; None: a quarter of the run
plateau_tol = 0.01         # relative change below which the loss counts as flat
''', "parameters"),
    code('''
import pandas as pd

from v3kit.live import LivePlot, add_rce_floor, explain_rce_loss, plateau_check, rce_floor
from v3kit.notebook_tools import ensure_rce, ensure_stage1, notebook_config
from v3kit.pipeline import prepare_data

cfg = notebook_config(run_dir=run_dir, seed=seed, smoke=smoke, n_queries=n_queries, sft_epochs=sft_epochs,
                      rce_epochs=rce_epochs, rce_lr=rce_lr,
                      rce=dict(t_start=t_start, t_end=t_end, temperature_target=temperature_target,
                               label_weight=label_weight))
splits = prepare_data(cfg)
stage1 = ensure_stage1(cfg, splits)  # reuses notebook 01's sft.pt, or trains SFT if it is missing
'''),
    md('''
## RCE, live

Top row: the loss with its floor `H(t)` (dashed), the loss above the floor, and the temperature schedule.
Bottom row: held-out metrics after each epoch; the dashed line is the SFT model (epoch 0).
'''),
    code('''
live = LivePlot(extras=rce_floor(splits.train, cfg.rce))
rce = ensure_rce(cfg, splits, stage1, callbacks=[live], fresh=True)  # writes rce_epoch{N}.pt
''', "plot"),
    code('''
h = add_rce_floor(rce.train_history, splits.train, cfg.rce)
raw = plateau_check(h["loss"], k=plateau_k, rel_tol=plateau_tol)
above_floor = plateau_check(h["excess_loss"], k=plateau_k, rel_tol=plateau_tol)
print("raw RCE loss:        ", raw)
print("loss - H(targets):   ", above_floor)
print("=>", explain_rce_loss(raw, above_floor))
'''),
    md('''
## Held-out metrics per epoch

Epoch 0 is the SFT model. RCE optimises towards the rewards, so `reward@1` should rise; watch whether `acc@1`
(the human label) and `utility@1` (the truth) follow or fall, and how far the policy drifts (`kl_to_sft`).
'''),
    code('''
cols = [c for c in ("epoch", "acc@1", "mrr", "reward@1", "utility@1", "kl_to_sft", "entropy") if c in rce.eval_history]
rce.eval_history[cols].set_index("epoch").round(4)
'''),
    md('''
Next: `03_grpo.ipynb` starts GRPO from the last `rce_epoch{N}.pt` in `run_dir`.
'''),
]

NB03 = [
    md('''
# 03 · Stage 3: GRPO, live, and a kl_beta comparison

Each training group is one query with its candidates; the seed treats every candidate as a sample:

```
A     = (r - mean_group r) / (std_group r + eps)          # group-relative advantage
ratio = exp(logp - old_logp)                              # old_logp: stage 1's SFT log-probs (seed)
pg    = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
kl    = ratio - 1 - log(ratio)        (kl_reference="old", seed)
        exp(ref - logp) - (ref - logp) - 1   (kl_reference="sft": k3 against the frozen SFT copy)
loss  = mean over valid candidates of (pg + kl_beta * kl)
```

**What to look for:** with the seed's `old_policy="sft"`, the ratio at GRPO's first step is not 1, because RCE
has already moved the policy away from SFT: the histogram below shows how much of it falls outside the clip
range (those entries get no gradient when the advantage points further out). `clip_ratio` stays high if so.
`kl` against the old policy measures drift from SFT only while the old policy *is* SFT. The held-out panels
show whether reward rises at the cost of the label (`acc@1`) and of the truth (`utility@1`).

`old_policy="refresh_at_start"` / `"refresh_each_epoch"` recompute `old_logp` from the current policy (as PPO does);
`kl_reference="sft"` keeps the KL anchored to SFT. The panel at the end compares settings side by side.
'''),
    code(SHARED_PARAMS + '''rce_epochs = None          # must match notebook 02 to reuse its RCE output
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
''', "parameters"),
    code('''
import copy

import pandas as pd

from v3kit.compare import ComparePanel, GRPOStart
from v3kit.grpo import run_grpo
from v3kit.live import LivePlot, grpo_panels, plot_ratio_hist, show
from v3kit.notebook_tools import ensure_rce, ensure_stage1, grpo_temperature, notebook_config
from v3kit.pipeline import prepare_data, stage_table
from v3kit.sft import sft_baseline

cfg = notebook_config(run_dir=run_dir, seed=seed, smoke=smoke, n_queries=n_queries, sft_epochs=sft_epochs,
                      rce_epochs=rce_epochs, rce_lr=rce_lr, grpo_epochs=grpo_epochs, grpo_lr=grpo_lr,
                      grpo=dict(kl_beta=kl_beta, eps_low=eps_low, eps_high=eps_high, old_policy=old_policy,
                                kl_reference=kl_reference))
splits = prepare_data(cfg)
stage1 = ensure_stage1(cfg, splits)      # notebook 01's sft.pt, or train SFT
rce = ensure_rce(cfg, splits, stage1)    # notebook 02's rce_epoch{N}.pt, or train RCE
'''),
    md('''
## GRPO, live

Per step: loss, `pg_loss`, `kl`, the ratio (mean, with the per-batch min..max as a band and the clip range
dotted), `clip_ratio`, entropy. Per epoch: held-out metrics, with the SFT model dashed (epoch 0 = after RCE).
'''),
    code('''
live = LivePlot(grpo_panels(cfg.grpo.eps_low, cfg.grpo.eps_high), baseline=sft_baseline(stage1, splits.val))
grpo = run_grpo(copy.deepcopy(rce.model), splits, stage1.old_log_probs, cfg.grpo, reference=stage1.reference,
                temperature=grpo_temperature(cfg, stage1.model_config), model_config=stage1.model_config,
                seed=cfg.seed, run_dir=cfg.run_dir, callbacks=[live], progress=False)
# grpo_epoch{N}.pt are now in run_dir
''', "plot"),
    md('''
## The ratio at GRPO step 0

Every valid `pi_theta / pi_old` on the training set before the first update. With `old_policy="sft"` after RCE
this is the distance RCE travelled; with a refreshed old policy it is exactly 1.
'''),
    code('''
show(plot_ratio_hist(grpo.info["step0_ratios"], cfg.grpo.eps_low, cfg.grpo.eps_high))
''', "plot"),
    md('''
## SFT vs RCE vs GRPO on the test split
'''),
    code('''
stage_table({"sft": stage1.reference, "rce": rce.model, "grpo": grpo.model}, splits.test, stage1.reference,
            stage1.model_config.sim_temperature).round(4)
'''),
    md('''
## Compare settings

Every run starts from the same post-RCE policy, stage-1 `old_log_probs` and seed; only GRPO trains. Move the
sliders and press **Run GRPO**: the run is added to the overlay (one colour per run, the legend names what
differs) and to the table of final held-out metrics. The cell after it runs `kl_betas` through the same code, so
the executed notebook has the comparison even with nobody clicking.
'''),
    code('''
panel = ComparePanel(GRPOStart.from_stages(cfg, splits, stage1, rce.model))
if compare_epochs is not None:
    panel.set(epochs=compare_epochs)
panel.widget
'''),
    code('''
panel.run_grid(kl_beta=kl_betas)
show(panel.figure)
panel.table.round(4)
''', "plot"),
]


NOTEBOOKS = {"01_sft_load": NB01, "02_rce_warmup": NB02, "03_grpo": NB03}


def build_all(out_dir: Path = HERE) -> list[Path]:
    return [build(name, cells, out_dir) for name, cells in NOTEBOOKS.items()]


if __name__ == "__main__":
    print("wrote", ", ".join(p.name for p in build_all()))
