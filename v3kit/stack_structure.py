"""What K pipeline runs must share to train as one stack (:func:`v3kit.pipeline_stacked.run_stacked`): the one home
of that rule. ``ablate``'s planner stacks by it the runs its per-structure grouping leaves alone; investigate's
search groups its trials by a stricter signature of its own (switches apart too, on measurement:
:func:`v3kit.doctor.search_stacked.signature`).

A stack trains its members' stages in lockstep on one batched model, so the members must share what shapes those
steps: the data, the model (its shape and switches; only ``sim_temperature``, a number the objectives read, may
differ), each stage's epochs, batch size and ``on_nonfinite``, the SFT checkpoint setting, and the run-level
settings of the process (device, precision, threads, candidate table, ``log_every``). The stacked trainer checks the
same things again on the built stages (:func:`v3kit.train.stacked_plan.sequential_reason`) and runs the members one
after another, with a note, when they differ after all.

Everything else may differ per member: the seed, every number, and the switches of the stages and rewards
(``grpo.samples``, ``grpo.kl_estimator``, ``grpo.old_policy``, ``rce.reward_norm``, ``reward.debias``,
``select``, ...). The members whose switches share a stacked objective train under one objective
(:func:`v3kit.train.stacked_losses.objective_key`); a member whose switches none covers takes its own
``Stage.step`` inside the same steps. The split is not part of the rule: callers that give the stack its splits
(a grid: one split per world) share them by construction, and :func:`run_stacked` checks the data section and split
seed when it builds the splits itself.
"""

from __future__ import annotations

from .config import RunConfig, to_dict
from .provenance import flatten

STAGES = ("sft", "rce", "grpo")
# per stage: what shapes its steps (the trainer's lockstep) or how a non-finite step is handled
STAGE_SHARED = ("epochs", "batch_size", "on_nonfinite")
# the run-level settings every member of one process's stack shares
RUN_SHARED = ("device", "precision", "threads", "candidate_table", "log_every")
MODEL_NUMBERS = ("model.sim_temperature",)  # the one model setting a stack's members may differ in


def stack_structure(cfg: RunConfig) -> tuple[tuple[str, str], ...]:
    """The settings of ``cfg`` that every member of its stack must share (see the module docstring), as sorted
    ``(key, repr(value))`` pairs: runs with equal structures can train as one stack."""
    flat = flatten(to_dict(cfg))
    shared = {f"{stage}.{name}" for stage in STAGES for name in STAGE_SHARED} | set(RUN_SHARED) | {"sft.checkpoint"}
    keep = [
        (k, repr(v))
        for k, v in flat.items()
        if k in shared or k.startswith("data.") or (k.startswith("model.") and k not in MODEL_NUMBERS)
    ]
    return tuple(sorted(keep))
