"""The scanner's ``Tick``: time out a saga past its deadline, or a step past its own
time (counted from when a worker began it) or its wait for a worker (``queue_timeout``);
re-send a message no worker began (lost with the broker, or waiting in a busy queue), and
a begun step whose worker went silent (its time limit, or an untimed step's heartbeat).
Also ``Abandoned``: re-send a step whose delivery died mid-run with no message left.
"""

from __future__ import annotations

from datetime import datetime

from celery_sagas.machine.decisions import Decision, RunCompensation, RunStep, ignore
from celery_sagas.machine.draft import _compensate_or_fail, _Draft, _skip_later_steps
from celery_sagas.machine.events import Abandoned
from celery_sagas.machine.types import (
    FORWARD_STATES,
    ErrorKind,
    SagaState,
    SagaView,
    StepStatus,
    StepView,
    own_deadline,
)


def _time_out(saga: SagaView, now: datetime, why: str) -> Decision:
    """The current step took too long: it may still have acted, so it is compensated too."""
    draft = _Draft.of(saga, now)
    index = saga.current_step
    current = saga.steps[index]
    if current.status == StepStatus.RUNNING:
        draft.step(index, StepStatus.TIMED_OUT, error=why, error_kind=ErrorKind.TIMEOUT)
    else:  # waiting for admission: nothing ran
        draft.step(index, StepStatus.SKIPPED, reason=why)
    _skip_later_steps(draft, index)
    draft.reason = f"{current.name} timed out: {why}"
    draft.timed_out = True
    _compensate_or_fail(draft, below=index + 1)
    return draft.done()


def _resend(saga: SagaView, now: datetime, why: str | None = None) -> Decision:
    """Send the current message again (same token; the guard dedupes)."""
    draft = _Draft.of(saga, now)
    index = saga.current_step
    current = saga.steps[index]
    forward = current.status == StepStatus.RUNNING
    timing = draft.timing(index, current.dispatches + 1, forward)
    timing.pop("deadline_at", None)  # a re-send does not extend the wait
    reason = f"re-sent (send {current.dispatches + 1})" + (f": {why}" if why else "")
    draft.step(index, current.status, reason=reason, **timing)
    draft.commands.append((RunStep if forward else RunCompensation)(index, saga.token))
    return draft.done()


def _abandoned(saga: SagaView, event: Abandoned, now: datetime) -> Decision:
    """The current step's delivery died mid-run (``Abandoned``): sent again, if the saga
    still waits for that step and token with it running (or compensating)."""
    if saga.state not in FORWARD_STATES | {SagaState.COMPENSATING}:
        return ignore(saga, f"saga is {saga.state}")
    if (saga.current_step, saga.token) != (event.step, event.token):
        return ignore(saga, f"saga waits for step {saga.current_step} token {saga.token}")
    running = StepStatus.RUNNING if saga.state in FORWARD_STATES else StepStatus.COMPENSATING
    if saga.steps[event.step].status != running:
        return ignore(saga, f"step {event.step} is {saga.steps[event.step].status}")
    return _resend(saga, now, event.reason)


def _due(moment: datetime | None, now: datetime) -> bool:
    return moment is not None and now >= moment


def _watch(saga: SagaView, now: datetime) -> Decision:
    """Nothing to do yet: only the next moment to look again changes (no log row)."""
    return _Draft.of(saga, now).done()


def _silent(saga: SagaView, current: StepView, now: datetime) -> bool:
    """A worker began the current send, and its own time (timeout + grace, from that
    start; an untimed step's heartbeat lease, from the last beat) is up with no outcome:
    the hard time limit or its worker's death ended it."""
    own = own_deadline(current, saga)
    return current.started and _due(own, now) and _due(current.redispatch_at, now)


def _silence(saga: SagaView, current: StepView) -> str:
    """Why a silent step is given up after its re-sends."""
    if current.timeout is None:
        lease = saga.heartbeat_lease or 0
        return f"no heartbeat from its worker for {lease:g}s, {current.dispatches} send(s)"
    limit = current.timeout + saga.time_limit_grace
    return f"no reply within {limit:g}s of starting"


def _tick_forward(saga: SagaView, current: StepView, now: datetime) -> Decision:
    if _due(saga.deadline_at, now):
        return _time_out(saga, now, "saga deadline passed")
    if current.status != StepStatus.RUNNING:
        return ignore(saga, "nothing due")
    if current.started:
        if not _silent(saga, current, now):
            return _watch(saga, now)
        if current.dispatches <= saga.max_redispatches:  # its worker may have died
            return _resend(saga, now, "no outcome after its time limit")
        return _time_out(saga, now, _silence(saga, current))
    if _due(current.deadline_at, now):
        return _time_out(saga, now, f"no worker began it within {saga.queue_timeout or 0:g}s")
    if _due(current.redispatch_at, now):
        return _resend(saga, now)
    return _watch(saga, now)


def _tick_compensation(saga: SagaView, current: StepView, now: datetime) -> Decision:
    """A compensation is never given up for want of a worker: a message no worker began
    is sent again (backing off), and so is one whose run ended with no outcome. Only a
    run that failed its retries dead-letters it (``CompensationFailed``)."""
    if current.status != StepStatus.COMPENSATING:
        return ignore(saga, "nothing due")
    if current.started:
        if _silent(saga, current, now):
            return _resend(saga, now, "no outcome after its time limit")
        return _watch(saga, now)
    if _due(current.redispatch_at, now):
        return _resend(saga, now)
    return _watch(saga, now)


def _tick(saga: SagaView, now: datetime) -> Decision:
    if saga.state not in FORWARD_STATES | {SagaState.COMPENSATING}:
        return ignore(saga, f"saga is {saga.state}")
    current = saga.steps[saga.current_step]
    if saga.state in FORWARD_STATES:
        return _tick_forward(saga, current, now)
    return _tick_compensation(saga, current, now)
