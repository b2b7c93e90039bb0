"""Generate ``notebooks/04_why_grpo_underperforms.ipynb`` (outputs stripped). Run from the repo root:

    .venv/bin/python notebooks/_build_04.py

The notebook is narrative plus calls; every computation lives in ``v3kit.ablate`` / ``v3kit.report_plots``.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

cells = [
    new_markdown_cell("""# 04 · Why GRPO underperforms

The user's "optimised" v3 run (RCE 3 epochs + GRPO 8 epochs) did **worse** than the SFT model it started from, and
the question is why: too little RCE, too little GRPO, or GRPO wrong for the task?

This notebook answers with controlled comparisons instead of single runs. An **ablation grid**
(`configs/ablate_default.yaml`) runs named variants of the seed configuration, each over several seeds, all
starting from **one shared SFT checkpoint** per synthetic world, and reports every variant's effect on the held-out
test set relative to SFT with a **95% bootstrap interval** (resampling both run seeds and test queries, paired with
the same SFT model on the same queries). "Worse" below means the interval of the difference excludes 0.

The synthetic world knows the truth: besides the label metric `acc@1` and the reward `reward@1`, every run reports
`utility@1`, the hidden true utility of the top-ranked candidate. The reward is utility + noise + an exploitable
style bias (`reward_bias`), so reward and label can disagree.

Same grid from the command line (resumable; finished runs are skipped):
```
v3kit ablate --grid configs/ablate_default.yaml --workers 2
```"""),
    new_code_cell("""# Parameters (papermill: -p smoke True runs the tiny grid in well under a minute)
grid = "configs/ablate_default.yaml"  # relative to the cwd or to the repository root
smoke = False  # True: configs/ablate_smoke.yaml, one process
workers = 2  # parallel worker processes for the runs
out_dir = None  # default: runs/ablate/<grid name> in the repository
seed = 0  # bootstrap seed
n_boot = 2000  # bootstrap replicates""", metadata={"tags": ["parameters"]}),
    new_code_cell("""import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from v3kit import ablate, report_plots

if smoke:
    grid, workers = "configs/ablate_smoke.yaml", 1
grid_path = ablate.find_grid(grid)
spec = ablate.load_grid(grid_path)
if out_dir is None:
    out_dir = grid_path.resolve().parents[1] / "runs" / "ablate" / spec.name
print(f"grid {grid_path}: {len(spec.variants)} variants x {len(spec.seeds)} seeds"
      + (f", plus {len(spec.worlds.levels)} other worlds" if spec.worlds else "") + f"; results in {out_dir}")"""),
    new_markdown_cell("""## 1 · Run the grid

One SFT checkpoint per world, then every (variant, seed) run from it. A rerun only executes runs whose result
file is missing or whose config changed."""),
    new_code_cell("""res = ablate.run_grid(spec, out_dir, workers=workers)
summary = res.summary(n_boot=n_boot, seed=seed)
comparisons = ablate.compare(res.frame, res.per_query, spec.questions, n_boot=n_boot, seed=seed)
print(f"{res.executed} runs executed, {res.skipped} skipped, {res.wall_s:.0f} s")
print(ablate.format_summary(summary, world=ablate.BASE_WORLD))"""),
    new_markdown_cell("""## 2 · Each variant's effect relative to SFT

Points are the mean paired difference (variant's final model minus the shared SFT model on the same test queries),
bars the 95% interval. Green / red: significantly better / worse; grey: the interval contains 0. Read the three
panels together: a variant that raises `reward@1` while `utility@1` falls is optimising the reward's bias, not the
task."""),
    new_code_cell("""fig = report_plots.forest_plot(summary)
plt.show()"""),
    new_markdown_cell("""The same, relative to the seed configuration (RCE 3 + GRPO 8) instead of SFT: which single change
to the seed makes a significant difference?"""),
    new_code_cell("""fig = report_plots.forest_plot(summary, against="reference")
plt.show()"""),
    new_markdown_cell("""## 3 · Where GRPO starts: the step-0 ratio

The seed computes `old_log_probs` once from SFT, before RCE. After RCE the policy has moved, so GRPO's PPO ratio
starts away from 1, and entries outside `[1 - eps, 1 + eps]` have their gradient clipped away before GRPO has
learnt anything. Refreshing the old policy puts the ratio at exactly 1."""),
    new_code_cell("""display(report_plots.step0_table(res.frame).round(3))"""),
    new_markdown_cell("""## 4 · Training curves: the seed next to the best GRPO variant

"Best" = the GRPO variant with the highest mean test `utility@1` on the default world (the hidden truth; chosen by
the code, so it follows the numbers). Top: held-out validation metrics per epoch after SFT (mean over seeds, band =
min..max), RCE first then GRPO. Bottom: per-step GRPO training logs of seed 0."""),
    new_code_cell("""best = res.best or ablate.best_variant(res.frame, spec)
show = [v for v in dict.fromkeys([spec.reference, best]) if v]
print("seed configuration:", spec.reference, "| best GRPO variant by utility@1:", best)
fig = report_plots.curves_plot(res.frame, show)
plt.show()
fig = report_plots.train_curves_plot({v: res.run_dir(v) for v in show})
plt.show()"""),
    new_markdown_cell("""## 5 · The doctor on the seed run

`v3kit doctor RUN_DIR` reads a run's `metrics.csv` and checks the symptoms DESIGN.md lists (step-0 ratio, clipping,
zero-std groups, KL, entropy, reward vs label, RCE convergence), each with the number behind it and a switch to
try. A single run's heuristics; the grid above is what says whether a switch matters."""),
    new_code_cell("""from v3kit import diagnose

for v in show:
    print(diagnose.format_report(diagnose.diagnose(res.run_dir(v)), title=f"GRPO health report: {v}, seed "
                                 f"{spec.seeds[0]} ({res.run_dir(v)})"))
    print()"""),
    new_markdown_cell("""## 6 · The user's proposed knobs: `kl_beta`, and GRPO epochs (the seed's 8 vs 25)

Each point is a variant that changes only that key of the seed configuration (0 GRPO epochs = RCE only)."""),
    new_code_cell("""kl_variants = ablate.single_key_variants(spec, "grpo.kl_beta")
fig = report_plots.sweep_plot(summary, spec, "grpo.kl_beta", kl_variants)
plt.show()
epoch_variants = ablate.single_key_variants(spec, "grpo.epochs")
fig = report_plots.sweep_plot(summary, spec, "grpo.epochs", epoch_variants)
plt.show()
fig = report_plots.curves_plot(res.frame, [v for v in epoch_variants if spec.value(v, "grpo.epochs") > 0],
                               stage="grpo", mark=spec.value(spec.reference, "grpo.epochs"))
plt.show()"""),
    new_markdown_cell("""## 7 · Which world makes GRPO help or hurt

The key comparison rerun in synthetic worlds that differ in one knob: `reward_bias` (how much the reward likes a
style the true utility ignores, i.e. reward/label disagreement) and `reward_noise`. Each point is the variant's
difference to that world's own SFT model; above 0 it helps, below it hurts."""),
    new_code_cell("""if spec.worlds:
    fig = report_plots.world_plot(summary, spec)
    plt.show()
    print(ablate.format_summary(summary[summary["world"] != ablate.BASE_WORLD]))
else:
    print("this grid has no worlds section")"""),
    new_markdown_cell("""## 8 · Conclusions (generated from the numbers above)

Nothing below is hand-written: `ablate.conclusions` lists which variants are significantly better or worse than
SFT and than the seed on each metric, answers the grid's questions with paired intervals, and summarises the
worlds. Rerun the notebook and the text follows the new numbers."""),
    new_code_cell("""print(ablate.conclusions(summary, comparisons=comparisons))"""),
]

nb = new_notebook(cells=cells, metadata={
    # python3 is the venv's own kernel when Jupyter runs from .venv; `make setup` also registers "v3kit".
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
})
for c in nb.cells:
    if c.cell_type == "code":
        c.outputs, c.execution_count = [], None
nbformat.validate(nb)
path = HERE / "04_why_grpo_underperforms.ipynb"
nbformat.write(nb, str(path))
print(f"wrote {path}")
