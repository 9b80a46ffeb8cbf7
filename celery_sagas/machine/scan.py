"""The scanner's ``Tick``: time out a step or saga whose deadline passed, and re-send a
message no worker started on (lost with the broker) a bounded number of times.
"""

from __future__ import annotations

from datetime import datetime

from celery_sagas.machine.decisions import Decision, RunCompensation, RunStep, ignore
from celery_sagas.machine.draft import _compensate_or_fail, _Draft, _skip_later_steps
from celery_sagas.machine.events import CompensationFailed
from celery_sagas.machine.replies import _compensation_failed
from celery_sagas.machine.types import (
    FORWARD_STATES,
    ErrorKind,
    SagaState,
    SagaView,
    StepStatus,
    StepView,
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
    _compensate_or_fail(draft, below=index + 1)
    return draft.done()


def _resend(saga: SagaView, now: datetime) -> Decision:
    """No reply yet: re-send the current message (same token; the guard dedupes)."""
    draft = _Draft.of(saga, now)
    index = saga.current_step
    current = saga.steps[index]
    forward = current.status == StepStatus.RUNNING
    timing = draft.timing(index, current.dispatches + 1, forward)
    timing.pop("deadline_at", None)  # a re-send does not extend the deadline
    draft.step(index, current.status, reason=f"re-sent (send {current.dispatches + 1})", **timing)
    draft.commands.append((RunStep if forward else RunCompensation)(index, saga.token))
    return draft.done()


def _due(moment: datetime | None, now: datetime) -> bool:
    return moment is not None and now >= moment


def _watch_deadline_only(saga: SagaView, now: datetime) -> Decision:
    """A worker is on it: no re-send; only the deadline is left to watch (no log row)."""
    return _Draft.of(saga, now).done()


def _resend_due(saga: SagaView, current: StepView, now: datetime) -> bool:
    """Re-send only a message no worker has started on (lost with the broker), and only
    ``max_redispatches`` times."""
    return (
        not current.started
        and _due(current.redispatch_at, now)
        and current.dispatches <= saga.max_redispatches
    )


def _tick(saga: SagaView, now: datetime) -> Decision:
    if saga.state not in FORWARD_STATES | {SagaState.COMPENSATING}:
        return ignore(saga, f"saga is {saga.state}")
    current = saga.steps[saga.current_step]
    if saga.state in FORWARD_STATES:
        if _due(saga.deadline_at, now):
            return _time_out(saga, now, "saga deadline passed")
        if current.status != StepStatus.RUNNING:
            return ignore(saga, "nothing due")
        if _due(current.deadline_at, now):
            return _time_out(saga, now, f"no reply within {current.timeout:g}s")
        if _resend_due(saga, current, now):
            return _resend(saga, now)
        if current.started and _due(current.redispatch_at, now):
            return _watch_deadline_only(saga, now)
        return ignore(saga, "nothing due")
    if current.status != StepStatus.COMPENSATING or not _due(current.redispatch_at, now):
        return ignore(saga, "nothing due")
    if current.started:
        return _watch_deadline_only(saga, now)
    if _resend_due(saga, current, now):
        return _resend(saga, now)
    error = f"no reply after {current.dispatches} sends"
    return _compensation_failed(saga, CompensationFailed(saga.current_step, saga.token, error), now)
