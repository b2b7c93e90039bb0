"""The search's pruner: Optuna's median rule, where the members of one stack count as each other's competitors.

Optuna's ``MedianPruner`` compares a trial's running best with the median of the *finished* trials at the same
step. Run one at a time, trial ``n`` competes with every finished trial before it. In a stack the members train in
lockstep and none has finished when the others report, so with the plain rule the members of one stack never
prune each other and nearly all of a stack of similar trials runs to the end (on module_routing the stacked
search finished 41 of 60 trials against 21 one at a time). :class:`StackMedianPruner` therefore adds the stack's
other running members that have reported the same step to the finished trials it compares with (what
successive-halving pruners do with every trial that reached a rung). A trial in no stack is judged exactly as
``MedianPruner`` judges it, so the one-at-a-time search (``--stack off``) is unchanged.

The members report in turn after each evaluation; :class:`StackRound` asks the pruner only once every live member
has reported the step, so that the first member of a stack is judged against the same peers as the last.
"""

from __future__ import annotations

from typing import Any, Sequence

STACK_ATTR = "stack_id"  # a trial's user attr: the number of its stack's first trial (absent: in no stack)


class _WithPeers:
    """A study seen by ``MedianPruner`` with ``finished`` (its finished trials and the peers, read once) as its
    finished trials."""

    def __init__(self, study: Any, finished: Sequence[Any]) -> None:
        self._study, self._finished = study, list(finished)

    @property
    def direction(self) -> Any:
        return self._study.direction

    def get_trials(self, deepcopy: bool = True, states: Sequence[Any] | None = None) -> list[Any]:
        from optuna.trial import TrialState

        if states is not None and tuple(states) == (TrialState.COMPLETE,):
            return list(self._finished)
        return self._study.get_trials(deepcopy=deepcopy, states=states)


class StackMedianPruner:
    """``MedianPruner(n_startup_trials, n_warmup_steps)`` that also counts a stack member's running peers (trials
    with the same :data:`STACK_ATTR` that have reported the step being judged) among the finished trials whose
    median it compares with (the wait for ``n_startup_trials`` still counts finished trials only). An Optuna
    pruner by its ``prune(study, trial)`` method (Optuna calls nothing else), so that this module imports without
    Optuna, which only the search needs."""

    def __init__(self, n_startup_trials: int = 5, n_warmup_steps: int = 0) -> None:
        import optuna

        self._median = optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps)
        self._startup = n_startup_trials

    def prune(self, study: Any, trial: Any) -> bool:
        from optuna.trial import TrialState

        stack = trial.user_attrs.get(STACK_ATTR)
        step = trial.last_step
        if stack is None or step is None:
            return self._median.prune(study, trial)
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        # the wait for the first finished trials counts finished ones only, as alone (peers join the median only)
        if len(finished) < self._startup:
            return False
        peers = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.number != trial.number and t.user_attrs.get(STACK_ATTR) == stack and step in t.intermediate_values
        ]
        return self._median.prune(_WithPeers(study, [*finished, *peers]), trial)


class StackRound:
    """The prune decisions of one stack's members (objects with ``pruned`` and ``trial``): a member's report joins
    the current round, and the round is decided (``trial.should_prune()`` for each of its members) once every
    member not yet pruned has reported; when one skipped the step (a non-finite val score) or stopped, as soon as a
    report of a later step arrives or the stack ends (:meth:`settle`)."""

    def __init__(self) -> None:
        self.members: list[Any] = []
        self._waiting: list[Any] = []
        self._step = -1

    def join(self, member: Any) -> None:
        self.members.append(member)

    def before_report(self, step: int) -> None:
        """Called before a member reports ``step``: a round of an earlier step still waiting is decided first."""
        if self._waiting and self._step != step:
            self.settle()

    def reported(self, member: Any, step: int) -> None:
        self._waiting.append(member)
        self._step = step
        if len(self._waiting) >= sum(not m.pruned for m in self.members):
            self.settle()

    def settle(self) -> None:
        """Decide the waiting round now."""
        waiting, self._waiting = self._waiting, []
        for m in waiting:
            m.pruned = bool(m.trial.should_prune())
