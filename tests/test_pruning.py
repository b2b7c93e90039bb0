"""The search's pruner (:mod:`v3kit.doctor.pruning`): a trial in no stack is judged exactly as Optuna's
``MedianPruner`` judges it; a stack member is judged against the median of the finished trials and its peers at the
step, computed here by hand; and a stack's round asks the pruner only once every live member has reported."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

optuna = pytest.importorskip("optuna")

from v3kit.doctor.pruning import STACK_ATTR, StackMedianPruner, StackRound  # noqa: E402
from v3kit.doctor.search_stacked import ReportOnVal  # noqa: E402

S = optuna.trial.TrialState
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(pruner=None):
    return optuna.create_study(direction="maximize", pruner=pruner or StackMedianPruner(n_startup_trials=5))


def _finished(study, values_by_step):
    study.add_trial(
        optuna.trial.create_trial(
            state=S.COMPLETE, value=0.0, params={}, distributions={}, intermediate_values=values_by_step
        )
    )


def _frozen(study, trial):
    return next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)


def test_a_trial_in_no_stack_is_judged_as_the_median_pruner_judges_it():
    """300 random studies (finished trials reporting at random steps, some NaN; a running trial's reports): the same
    decision as ``MedianPruner`` with the same settings, at every step of the running trial."""
    rng = random.Random(0)
    decisions = []
    for case in range(300):
        startup, warmup = rng.randint(0, 4), rng.randint(0, 3)
        study = _study()
        for _ in range(rng.randint(0, 7)):
            steps = rng.sample(range(8), rng.randint(0, 8))
            _finished(study, {s: (math.nan if rng.random() < 0.1 else rng.random()) for s in steps})
        trial = study.ask()
        ours = StackMedianPruner(n_startup_trials=startup, n_warmup_steps=warmup)
        theirs = optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup)
        for step in range(8):
            trial.report(rng.random(), step)
            frozen = _frozen(study, trial)
            decisions.append(ours.prune(study, frozen))
            assert decisions[-1] == theirs.prune(study, frozen), (case, step)
    assert 0 < sum(decisions) < len(decisions)  # both outcomes were met


def _median_by_hand(member_best, finished, peers, step):
    """Prune when the member's best is below the median of every value reported at ``step`` by the finished trials
    and the peers (none: keep)."""
    values = [t[step] for t in [*finished, *peers] if step in t and not math.isnan(t[step])]
    return bool(values) and member_best < float(np.median(values))


def test_a_stack_member_is_judged_against_the_finished_trials_and_its_peers():
    """Random finished trials and two stacks of running trials: each member's decision equals the median of the
    finished trials' and its own stack's other members' values at that step (computed here), not the other
    stack's, and not of peers that have not reported the step."""
    rng = random.Random(1)
    checked = changed = 0
    for case in range(100):
        study = _study()
        finished = [{s: rng.random() for s in rng.sample(range(4), rng.randint(1, 4))} for _ in range(5)]
        for f in finished:
            _finished(study, f)
        stacks: dict[int, list[tuple[object, dict[int, float]]]] = {0: [], 1: []}
        for stack in (0, 1, 0, 1, 0, 0):
            trial = study.ask()
            trial.set_user_attr(STACK_ATTR, stack)
            values = {s: rng.random() for s in range(rng.randint(1, 4))}  # some stopped early
            for s, v in values.items():
                trial.report(v, s)
            stacks[stack].append((trial, values))
        pruner = StackMedianPruner(n_startup_trials=5)
        for stack, members in stacks.items():
            for trial, values in members:
                step = max(values)
                best = max(values.values())
                peers = [v for t, v in members if t is not trial]
                want = _median_by_hand(best, finished, peers, step)
                got = pruner.prune(study, _frozen(study, trial))
                assert got == want, (case, stack, trial.number)
                changed += want != _median_by_hand(best, finished, [], step)
                checked += 1
    assert changed > 10  # the peers decided some of these cases


def test_the_wait_for_finished_trials_counts_finished_trials_only():
    """Four finished trials and seven peers far above a member: no decision yet (the pruner waits for five
    finished trials), as a trial run alone would not be judged; the fifth finished trial starts the judging."""
    study = _study()
    for _ in range(4):
        _finished(study, {0: 0.9})
    members = []
    for k in range(8):
        trial = study.ask()
        trial.set_user_attr(STACK_ATTR, 7)
        trial.report(0.1 if k == 0 else 0.9, 0)
        members.append(trial)
    pruner = StackMedianPruner(n_startup_trials=5)
    assert not pruner.prune(study, _frozen(study, members[0]))
    _finished(study, {0: 0.9})
    assert pruner.prune(study, _frozen(study, members[0]))


def _reporters(study, n, stack=3):
    rnd = StackRound()
    out = []
    for _ in range(n):
        trial = study.ask()
        trial.set_user_attr(STACK_ATTR, stack)
        r = ReportOnVal(trial, "acc@1")
        r.join(rnd)
        out.append(r)
    return rnd, out


def _val(v):
    return {"split": "val", "acc@1": v}


def test_a_round_is_decided_once_every_live_member_has_reported():
    """Five finished trials that report nothing past step 1; three members report steps 0-2, the weakest first. At
    step 2 the median is of the peers only: the first member (0.1, peers 0.5 and 0.9) is pruned, which it would not
    be if it were judged before its peers reported; the others are not (0.5 is not below 0.5)."""
    study = _study(StackMedianPruner(n_startup_trials=5, n_warmup_steps=2))
    for _ in range(5):
        _finished(study, {0: 0.3, 1: 0.3})
    rnd, (a, b, c) = _reporters(study, 3)
    for v in (0.05, 0.05):  # steps 0 and 1: the warm-up
        for r in (a, b, c):
            r.on_eval(_val(v))
    assert not any(r.pruned for r in (a, b, c))
    for r, v in ((a, 0.1), (b, 0.5), (c, 0.9)):
        r.on_eval(_val(v))
        if r is not c:
            assert not a.pruned  # nothing is decided while a member has still to report
    assert (a.pruned, b.pruned, c.pruned) == (True, False, False)
    a.on_eval(_val(0.99))  # a pruned member reports nothing more
    assert max(_frozen(study, a.trial).intermediate_values) == 2
    # the next round waits for the two members left
    b.on_eval(_val(0.2))
    assert not b.pruned
    c.on_eval(_val(0.95))
    assert (b.pruned, c.pruned) == (True, False)  # best 0.5 below the one peer's 0.95


def test_a_member_that_skips_a_step_does_not_hold_the_round():
    """A member without a finite val score at a step reports nothing there: the round of that step is decided when
    the next step's first report arrives, and a round the stack ends on is decided by ``settle``."""
    study = _study(StackMedianPruner(n_startup_trials=5, n_warmup_steps=0))
    for _ in range(5):
        _finished(study, {})
    rnd, (a, b, c) = _reporters(study, 3)
    a.on_eval(_val(0.1))
    b.on_eval(_val(0.9))
    c.on_eval(_val(float("nan")))  # skipped: step 0 is still waiting for it
    assert not a.pruned
    a.on_eval(_val(0.1))  # a report of step 1: step 0's round is decided first, with the peers it has
    assert a.pruned and not b.pruned
    assert max(_frozen(study, a.trial).intermediate_values) == 0  # pruned by that decision: it reports no more
    b.on_eval(_val(0.9))
    c.on_eval(_val(float("nan")))
    assert not b.pruned  # the round of step 1 waits for c
    rnd.settle()  # the stack ended: b is judged at step 1 (no peer reported it, so the median is empty)
    assert not b.pruned
    assert b.trial.should_prune() is False
