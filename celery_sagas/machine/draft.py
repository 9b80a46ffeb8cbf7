"""Building a decision: ``_Draft`` accumulates step and saga changes, and the helpers that
every handler shares decide which step to compensate next and whether a reply is current.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from celery_sagas.machine.decisions import (
    Command,
    DeadLetterChange,
    Decision,
    RunCompensation,
    RunStep,
    StepChange,
    Transition,
)
from celery_sagas.machine.types import (
    FORWARD_STATES,
    ErrorKind,
    SagaState,
    SagaView,
    StepStatus,
    StepView,
    own_deadline,
)


@dataclass
class _Draft:
    """Accumulates one decision; keeps step statuses current as changes are added."""

    saga: SagaView
    now: datetime
    state: SagaState | None
    current_step: int
    token: int
    statuses: list[StepView]
    reason: str | None = None
    timed_out: bool = False
    actor: str | None = None
    dead_letter: DeadLetterChange | None = None
    changes: list[StepChange] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)

    @classmethod
    def of(cls, saga: SagaView, now: datetime) -> _Draft:
        return cls(saga, now, saga.state, saga.current_step, saga.token, list(saga.steps))

    def step(self, index: int, new: StepStatus, reason: str | None = None, **details: Any) -> None:
        old = self.statuses[index]
        kept: dict[str, Any] = {
            k: details[k] for k in ("error_kind", "deadline_at", "redispatch_at") if k in details
        }
        if new not in (StepStatus.RUNNING, StepStatus.COMPENSATING):
            kept.update(deadline_at=None, redispatch_at=None)
        if new != old.status:  # a new run: no worker has begun it yet
            kept.update(started=False, began_at=None)
        self.statuses[index] = replace(old, status=new, **kept)
        self.changes.append(StepChange(index, old.status, new, **details))
        why = reason or details.get("error")
        self.transitions.append(Transition(old.name, old.status.value, new.value, why))

    def timing(self, index: int, dispatches: int, forward: bool) -> dict[str, Any]:
        """Re-send time (and, with a ``queue_timeout``, the deadline of a forward step's
        wait for a worker) of a step sent now for the ``dispatches``-th time. A step's own
        timeout counts from when a worker begins it (``own_deadline``), not from here."""
        timeout = self.statuses[index].timeout
        queue_timeout = self.saga.queue_timeout
        details: dict[str, Any] = {"dispatches": dispatches}
        if forward and dispatches == 1:
            wait = None if queue_timeout is None else self.now + timedelta(seconds=queue_timeout)
            details["deadline_at"] = wait
        first = first_resend(timeout, self.saga)
        if first is not None:
            details["redispatch_at"] = self.now + resend_interval(first, dispatches)
        return details

    def due_at(self) -> datetime | None:
        """When the scanner must next look at this saga (None: nothing to watch)."""
        if self.state not in FORWARD_STATES | {SagaState.COMPENSATING}:
            return None
        current = self.statuses[self.current_step]
        moments: list[datetime | None] = []
        if current.status not in (StepStatus.RUNNING, StepStatus.COMPENSATING):
            pass
        elif current.started:
            own = own_deadline(current, self.saga)
            moments = [max(own, current.redispatch_at or own)] if own else []
        else:
            moments = [current.redispatch_at]
            if current.status == StepStatus.RUNNING:
                moments.append(current.deadline_at)
        if self.state in FORWARD_STATES:
            moments.append(self.saga.deadline_at)
        return min((m for m in moments if m is not None), default=None)

    def saga_state(self, new: SagaState, reason: str | None = None) -> None:
        old = self.state.value if self.state else "-"
        if self.state != new:
            self.transitions.append(Transition(None, old, new.value, reason))
        self.state = new

    def dispatch(self, command_type: type[RunStep] | type[RunCompensation], index: int) -> None:
        self.token += 1
        self.current_step = index
        self.commands.append(command_type(index, self.token))

    def done(self) -> Decision:
        return Decision(
            accepted=True,
            state=self.state,
            current_step=self.current_step,
            token=self.token,
            reason=self.reason,
            timed_out=self.timed_out,
            step_changes=tuple(self.changes),
            transitions=tuple(self.transitions),
            commands=tuple(self.commands),
            due_at=self.due_at(),
            actor=self.actor,
            dead_letter=self.dead_letter,
        )


MAX_RESEND_INTERVAL = 300.0  # seconds: re-sends of a waiting message back off to this


def first_resend(timeout: float | None, saga: SagaView) -> float | None:
    """Seconds after its first send that a message no worker began is sent again: a
    fraction of the step's timeout; for an untimed step, ``untimed_resend`` (None: never)."""
    if timeout is None:
        return saga.untimed_resend
    return timeout / (saga.max_redispatches + 1)


def resend_interval(first: float, dispatches: int) -> timedelta:
    """How long after its ``dispatches``-th send a message no worker began is sent again:
    ``first`` seconds, doubling with each send, capped."""
    return timedelta(seconds=min(MAX_RESEND_INTERVAL, first * 2.0 ** min(dispatches - 1, 16)))


def needs_compensation(step: StepView) -> bool:
    """Completed or timed-out steps may have acted; so may a step that failed unexpectedly."""
    if step.status in (StepStatus.COMPLETED, StepStatus.TIMED_OUT):
        return True
    return step.status == StepStatus.FAILED and step.error_kind != ErrorKind.BUSINESS


def next_to_compensate(steps: Sequence[StepView], below: int) -> int | None:
    """The highest step index below ``below`` that still needs compensation."""
    for index in range(below - 1, -1, -1):
        if needs_compensation(steps[index]):
            return index
    return None


def _compensate_or_fail(draft: _Draft, below: int) -> None:
    target = next_to_compensate(draft.statuses, below)
    if target is None:
        draft.saga_state(SagaState.FAILED, draft.reason)
        return
    draft.saga_state(SagaState.COMPENSATING, draft.reason)
    draft.step(target, StepStatus.COMPENSATING, **draft.timing(target, 1, forward=False))
    draft.dispatch(RunCompensation, target)


def _timed_out(step: StepView) -> bool:
    return step.status == StepStatus.TIMED_OUT or step.error_kind == ErrorKind.TIMEOUT


def _expects_reply(
    saga: SagaView, step: int, token: int, states: frozenset[SagaState], status: StepStatus
) -> str | None:
    """Why a reply is not for the saga's current attempt, or None if it is."""
    forward_reply = status == StepStatus.RUNNING
    if forward_reply and 0 <= step < len(saga.steps) and _timed_out(saga.steps[step]):
        return f"late: {saga.steps[step].name} already timed out"
    if saga.state not in states:
        return f"saga is {saga.state}"
    if step != saga.current_step:
        return f"step {step} is not the current step {saga.current_step}"
    if token != saga.token:
        return f"token {token} is not the current token {saga.token}"
    if saga.steps[step].status != status:
        late = saga.steps[step].status == StepStatus.TIMED_OUT
        return ("late: " if late else "") + f"step is {saga.steps[step].status}"
    return None


def _skip_later_steps(draft: _Draft, index: int) -> None:
    for later in range(index + 1, len(draft.saga.steps)):
        if draft.statuses[later].status == StepStatus.PENDING:
            draft.step(later, StepStatus.SKIPPED)
