"""GRPO health report ("doctor"): read a run's ``metrics.csv`` (and ``config.yaml``) and check the symptoms of
the suspects in ``docs/pipeline.md`` ("Why GRPO might underperform"), each with the number behind it and a switch to try.

Each check is one function registered with ``@check(name)``; they run in the order ``context.REPORT_ORDER``
declares (``check_names()``):

* ``step0_ratio``: the PPO ratio at GRPO step 0 is not ~1 (stale old policy or temperature mismatch).
* ``clip_ratio``: the clip removes the gradient of many entries for long stretches (updates throttled).
* ``zero_std_groups``: many groups have no reward spread, hence zero advantage (no signal).
* ``kl_growth``: KL to the SFT model still climbing at the end of GRPO and already large (nothing anchors it).
* ``kl_pinned``: the KL penalty is ~0 throughout (the KL term does nothing).
* ``entropy_collapse``: the policy's entropy fell by a large fraction during GRPO.
* ``reward_vs_label``: the reward of the top pick rose (read off regret@1, so no constant shift or scaling of the
  reward changes the verdict) while label metrics (acc@1, mrr; utility@1 where the data knows it) fell.
* ``rce_converged``: did RCE move the policy (KL to SFT) and is it still closing its gap to the loss floor
  H(targets)? Says "lr too small to move the policy" when it barely moved. Reads ``metrics.csv`` and the data only,
  so a full run and an ablation folder without per-epoch checkpoints get the same verdict.
* ``reward_shortcut``: the share of within-group reward variance that candidate features alone explain (the part
  of the reward any query would give; ``v3kit/data/shortcut.py``), and what the policy's change from SFT followed.
* ``rce_targets``: how concentrated RCE's targets are at t_start and t_end (the temperature is in reward units
  unless ``rce.reward_norm`` normalises per group).
* ``baselines``: SFT against random, raw-feature cosine and the reward's argmax (``v3kit/train/baselines.py``).

The last three (and RCE's loss floor) need the data: on a run dir it is rebuilt from ``config.yaml``; on a bare frame
pass ``splits=`` or they are skipped. None of them needs a true utility.

Every flagged finding carries ``switches``: the config overrides to *test*. ``v3kit doctor RUN --grid`` writes
``RUN/doctor_grid.yaml``, an ablation of those switches against the run itself (see ``grid.py``).

A check whose stage or columns are missing is reported as skipped (``triggered=False``, ``value=None``) with the
reason; the doctor never fails on a partial run.

The diagnosis floor: besides the checks (``context``, ``grpo_checks``, ``data_checks``, ``report``) it holds
``rce_analysis`` (did RCE learn: its loss floor and plateau), ``grid`` (``doctor --grid``: the ablation of the
suggested switches) and ``investigate`` (from a run to a verdict; the ``v3kit investigate`` command in
``investigate_cli``). It may import every floor below it: the data, the training stages, the run config and
pipeline, and the ablation runner (``tests/test_layout.py`` checks it); never the notebook helpers.
"""

from .context import DoctorContext, Finding, Thresholds, check, check_names, load_run, switch_tokens
from .report import cmd_doctor, diagnose, evidence, evidence_order, format_report, register_cli, report_frame

__all__ = [
    "DoctorContext",
    "Finding",
    "Thresholds",
    "check",
    "check_names",
    "cmd_doctor",
    "diagnose",
    "evidence",
    "evidence_order",
    "format_report",
    "load_run",
    "register_cli",
    "report_frame",
    "switch_tokens",
]
