"""The saga state machine: pure decisions, no I/O, no clock.

``decide(saga, event, now)`` returns a ``Decision``: the new saga state, the step status
changes, the transition-log entries and the commands to dispatch. The coordinator stores
all of it in one transaction; Celery only carries the commands out.

The package is split by concern, dependencies pointing one way:
``types`` (states, views) ← ``events`` and ``decisions`` ← ``draft`` (building a decision)
← ``replies`` (begin, admit, worker replies) ← ``scan`` (ticks) and ``operator`` (retry,
discard, cancel) ← this module (``decide``).
"""

from __future__ import annotations

from datetime import datetime

from celery_sagas.machine.decisions import (
    Command,
    DeadLetterChange,
    Decision,
    RunCompensation,
    RunStep,
    SendToDeadLetterQueue,
    StepChange,
    Transition,
    ignore,
)
from celery_sagas.machine.draft import needs_compensation, next_to_compensate
from celery_sagas.machine.events import (
    Abandoned,
    Admit,
    Begin,
    Cancel,
    CompensationFailed,
    CompensationSucceeded,
    Event,
    Migrated,
    OperatorDiscard,
    OperatorRetry,
    StepFailed,
    StepSucceeded,
    Tick,
)
from celery_sagas.machine.operator import _cancel, _migrated, _operator_discard, _operator_retry
from celery_sagas.machine.replies import (
    _admit,
    _begin,
    _compensation_failed,
    _compensation_succeeded,
    _step_failed,
    _step_succeeded,
)
from celery_sagas.machine.scan import _abandoned, _tick
from celery_sagas.machine.types import (
    FORWARD_STATES,
    LIVE_STATES,
    SETTLED_STATES,
    TERMINAL_STATES,
    ErrorKind,
    Role,
    SagaState,
    SagaView,
    StepStatus,
    StepView,
)

__all__ = [
    "FORWARD_STATES",
    "LIVE_STATES",
    "SETTLED_STATES",
    "TERMINAL_STATES",
    "Abandoned",
    "Admit",
    "Begin",
    "Cancel",
    "Command",
    "CompensationFailed",
    "CompensationSucceeded",
    "DeadLetterChange",
    "Decision",
    "ErrorKind",
    "Event",
    "Migrated",
    "OperatorDiscard",
    "OperatorRetry",
    "Role",
    "RunCompensation",
    "RunStep",
    "SagaState",
    "SagaView",
    "SendToDeadLetterQueue",
    "StepChange",
    "StepFailed",
    "StepStatus",
    "StepSucceeded",
    "StepView",
    "Tick",
    "Transition",
    "decide",
    "ignore",
    "needs_compensation",
    "next_to_compensate",
]


def decide(saga: SagaView, event: Event, now: datetime) -> Decision:
    """The one transition function. ``now`` is passed in, never read."""
    match event:
        case Begin():
            return _begin(saga, event, now)
        case Admit():
            return _admit(saga, now)
        case Tick():
            return _tick(saga, now)
        case Abandoned():
            return _abandoned(saga, event, now)
        case StepSucceeded():
            return _step_succeeded(saga, event, now)
        case StepFailed():
            return _step_failed(saga, event, now)
        case CompensationSucceeded():
            return _compensation_succeeded(saga, event, now)
        case CompensationFailed():
            return _compensation_failed(saga, event, now)
        case OperatorRetry():
            return _operator_retry(saga, event, now)
        case OperatorDiscard():
            return _operator_discard(saga, event, now)
        case Cancel():
            return _cancel(saga, event, now)
        case Migrated():
            return _migrated(saga, event, now)
    raise TypeError(f"unknown event {event!r}")
