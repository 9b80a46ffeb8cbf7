"""Starting a saga and handling worker replies: admission, step success and failure,
compensation success and failure. Replies that are not for the current attempt are ignored.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from celery_sagas.machine.decisions import (
    DeadLetterChange,
    Decision,
    RunStep,
    SendToDeadLetterQueue,
    ignore,
)
from celery_sagas.machine.draft import (
    _compensate_or_fail,
    _Draft,
    _expects_reply,
    _skip_later_steps,
)
from celery_sagas.machine.events import (
    Begin,
    CompensationFailed,
    CompensationSucceeded,
    StepFailed,
    StepSucceeded,
)
from celery_sagas.machine.types import FORWARD_STATES, ErrorKind, SagaState, SagaView, StepStatus


def _run_first_step(draft: _Draft) -> Decision:
    draft.step(0, StepStatus.RUNNING, **draft.timing(0, 1, forward=True))
    draft.dispatch(RunStep, 0)
    return replace(draft.done(), admitted=True)


def _begin(saga: SagaView, event: Begin, now: datetime) -> Decision:
    if saga.state is not None:
        return ignore(saga, f"saga already {saga.state}")
    draft = _Draft.of(saga, now)
    draft.saga_state(SagaState.STARTED, None if event.admit else "waiting for a free slot")
    return _run_first_step(draft) if event.admit else draft.done()


def _admit(saga: SagaView, now: datetime) -> Decision:
    if saga.state != SagaState.STARTED or saga.steps[0].status != StepStatus.PENDING:
        return ignore(saga, "not waiting for admission")
    return _run_first_step(_Draft.of(saga, now))


def _step_succeeded(saga: SagaView, event: StepSucceeded, now: datetime) -> Decision:
    why = _expects_reply(saga, event.step, event.token, FORWARD_STATES, StepStatus.RUNNING)
    if why:
        return ignore(saga, why)
    draft = _Draft.of(saga, now)
    draft.step(
        event.step,
        StepStatus.COMPLETED,
        result=event.result,
        has_result=True,
        attempts=event.attempts,
    )
    following = event.step + 1
    if following == len(saga.steps):
        draft.saga_state(SagaState.COMPLETED)
    else:
        draft.saga_state(SagaState.PENDING)
        draft.step(following, StepStatus.RUNNING, **draft.timing(following, 1, forward=True))
        draft.dispatch(RunStep, following)
    return draft.done()


def _step_failed(saga: SagaView, event: StepFailed, now: datetime) -> Decision:
    why = _expects_reply(saga, event.step, event.token, FORWARD_STATES, StepStatus.RUNNING)
    if why:
        return ignore(saga, why)
    draft = _Draft.of(saga, now)
    if event.timed_out:  # interrupted at its time limit: compensated like a scanner timeout
        status, kind = StepStatus.TIMED_OUT, ErrorKind.TIMEOUT
    else:
        status = StepStatus.FAILED
        kind = ErrorKind.BUSINESS if event.business else ErrorKind.ERROR
    draft.step(event.step, status, error=event.error, error_kind=kind, attempts=event.attempts)
    _skip_later_steps(draft, event.step)
    draft.reason = f"{saga.steps[event.step].name} failed: {event.error}"
    draft.timed_out = event.timed_out
    _compensate_or_fail(draft, below=event.step + 1)
    return draft.done()


def _late_success_of_a_dead_letter(saga: SagaView, event: CompensationSucceeded) -> bool:
    """A run of the compensation that was dead-lettered (a redelivery that began before)
    finished well after all: the compensation is done, the dead letter resolved."""
    return (
        saga.state == SagaState.COMPENSATION_FAILED
        and event.step == saga.current_step
        and event.token == saga.token
        and saga.steps[event.step].status == StepStatus.COMPENSATION_FAILED
    )


def _compensation_succeeded(
    saga: SagaView, event: CompensationSucceeded, now: datetime
) -> Decision:
    why = _expects_reply(
        saga, event.step, event.token, frozenset({SagaState.COMPENSATING}), StepStatus.COMPENSATING
    )
    if why and not _late_success_of_a_dead_letter(saga, event):
        return ignore(saga, why)
    draft = _Draft.of(saga, now)
    draft.step(event.step, StepStatus.COMPENSATED, attempts=event.attempts)
    # a no-op unless this compensation was re-run from the dead-letter queue
    draft.dead_letter = DeadLetterChange(event.step, "resolved", resolution="compensated")
    _compensate_or_fail(draft, below=event.step)
    return draft.done()


def _compensation_failed(saga: SagaView, event: CompensationFailed, now: datetime) -> Decision:
    why = _expects_reply(
        saga, event.step, event.token, frozenset({SagaState.COMPENSATING}), StepStatus.COMPENSATING
    )
    if why:
        return ignore(saga, why)
    draft = _Draft.of(saga, now)
    draft.step(
        event.step, StepStatus.COMPENSATION_FAILED, error=event.error, attempts=event.attempts
    )
    draft.reason = f"compensation of {saga.steps[event.step].name} failed: {event.error}"
    draft.saga_state(SagaState.COMPENSATION_FAILED, draft.reason)
    draft.dead_letter = DeadLetterChange(
        event.step, "dead", event.error, event.traceback, event.attempts
    )
    draft.commands.append(SendToDeadLetterQueue(event.step))
    return draft.done()
