"""What people do to a saga: re-run or discard a dead compensation (from the dead-letter
queue), and cancel a running saga, which is compensated like a failure.
"""

from __future__ import annotations

from datetime import datetime

from celery_sagas.machine.decisions import (
    DeadLetterChange,
    Decision,
    RunCompensation,
    RunStep,
    ignore,
)
from celery_sagas.machine.draft import _compensate_or_fail, _Draft, _skip_later_steps
from celery_sagas.machine.events import Cancel, Migrated, OperatorDiscard, OperatorRetry
from celery_sagas.machine.types import FORWARD_STATES, ErrorKind, SagaState, SagaView, StepStatus


def _dead_step(saga: SagaView, step: int) -> str | None:
    """Why an operator action on ``step`` does not apply, or None if it does."""
    if saga.state != SagaState.COMPENSATION_FAILED:
        return f"saga is {saga.state}, not COMPENSATION_FAILED"
    if step != saga.current_step or saga.steps[step].status != StepStatus.COMPENSATION_FAILED:
        return f"the compensation of step {step} is not the dead one"
    return None


def _operator_retry(saga: SagaView, event: OperatorRetry, now: datetime) -> Decision:
    why = _dead_step(saga, event.step)
    if why:
        return ignore(saga, why)
    draft = _Draft.of(saga, now)
    draft.actor = event.actor
    said = f"retry by {event.actor}" + (f": {event.reason}" if event.reason else "")
    draft.saga_state(SagaState.COMPENSATING, said)
    timing = draft.timing(event.step, 1, forward=False)
    draft.step(event.step, StepStatus.COMPENSATING, reason=said, **timing)
    draft.dispatch(RunCompensation, event.step)
    draft.dead_letter = DeadLetterChange(event.step, "retrying", resolution=said)
    return draft.done()


def _operator_discard(saga: SagaView, event: OperatorDiscard, now: datetime) -> Decision:
    why = _dead_step(saga, event.step)
    if why:
        return ignore(saga, why)
    draft = _Draft.of(saga, now)
    draft.actor = event.actor
    said = f"compensated manually by {event.actor}: {event.reason}"
    draft.step(event.step, StepStatus.COMPENSATED, reason=said)
    draft.dead_letter = DeadLetterChange(event.step, "discarded", resolution=said)
    _compensate_or_fail(draft, below=event.step)
    return draft.done()


def _cancel(saga: SagaView, event: Cancel, now: datetime) -> Decision:
    if saga.state not in FORWARD_STATES:
        return ignore(saga, f"saga is {saga.state}: only a running saga can be cancelled")
    draft = _Draft.of(saga, now)
    draft.actor = event.actor
    said = f"cancelled by {event.actor}: {event.reason}"
    index = saga.current_step
    if saga.steps[index].status == StepStatus.RUNNING:  # it may have acted: compensate it
        draft.step(index, StepStatus.FAILED, error=said, error_kind=ErrorKind.ERROR)
    else:
        draft.step(index, StepStatus.SKIPPED, reason=said)
    _skip_later_steps(draft, index)
    draft.reason = said
    _compensate_or_fail(draft, below=index + 1)
    return draft.done()


def _migrated(saga: SagaView, event: Migrated, now: datetime) -> Decision:
    """Send the current step, under the definition the saga was moved onto, with a new
    token (a message sent under the old one is stale from now on)."""
    if saga.state not in FORWARD_STATES:
        return ignore(saga, f"saga is {saga.state}: only a running saga can move")
    draft = _Draft.of(saga, now)
    draft.actor = event.actor
    index = saga.current_step
    draft.step(index, StepStatus.RUNNING, reason=event.reason, **draft.timing(index, 1, True))
    draft.dispatch(RunStep, index)
    return draft.done()
