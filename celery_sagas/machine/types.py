"""The saga machine's vocabulary of state: saga and step statuses, step roles, error
kinds, the state sets the store and scanner query by, and the read-only views ``decide``
gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum


class SagaState(StrEnum):
    STARTED = "STARTED"
    PENDING = "PENDING"
    COMPENSATING = "COMPENSATING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    COMPENSATION_FAILED = "COMPENSATION_FAILED"


class StepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"
    SKIPPED = "skipped"


class Role(StrEnum):
    """What a step message runs: the step's action or its compensation. The value is
    the last part of the guard key and the ``kind`` of a step message."""

    ACTION = "action"
    COMPENSATION = "compensation"


class ErrorKind(StrEnum):
    BUSINESS = "business"  # the step declined and did not act: not compensated
    ERROR = "error"  # unknown outcome: compensated
    TIMEOUT = "timeout"


TERMINAL_STATES = frozenset({SagaState.COMPLETED, SagaState.FAILED})
SETTLED_STATES = TERMINAL_STATES | {SagaState.COMPENSATION_FAILED}
FORWARD_STATES = frozenset({SagaState.STARTED, SagaState.PENDING})
LIVE_STATES = FORWARD_STATES | {SagaState.COMPENSATING}


@dataclass(frozen=True)
class StepView:
    index: int
    name: str
    status: StepStatus
    error_kind: ErrorKind | None = None
    timeout: float | None = None  # seconds one attempt may take (from definition/config)
    deadline_at: datetime | None = None  # while running: when it times out
    redispatch_at: datetime | None = None  # when to re-send if no reply came (lost message)
    dispatches: int = 0  # sends of the current run or compensation, re-sends included
    started: bool = False  # a worker began executing it: the message was not lost
    began_at: datetime | None = None  # when a worker last began executing it


def own_deadline(step: StepView, saga: SagaView) -> datetime | None:
    """When a started step's own time is up: its timeout (plus the hard limit's grace)
    counted from when a worker began it. An untimed step has no time of its own: its
    worker's heartbeat moves ``began_at`` on, and it is silent once ``heartbeat_lease``
    passed since the last beat. None if it has not begun (or nothing bounds it)."""
    if step.began_at is None:
        return None
    if step.timeout is None:
        lease = saga.heartbeat_lease
        return None if lease is None else step.began_at + timedelta(seconds=lease)
    return step.began_at + timedelta(seconds=step.timeout + saga.time_limit_grace)


@dataclass(frozen=True)
class SagaView:
    saga_id: str
    name: str
    state: SagaState | None  # None: not persisted yet
    current_step: int
    token: int
    steps: tuple[StepView, ...]
    deadline_at: datetime | None = None  # the saga-wide deadline
    max_redispatches: int = 2  # re-sends of a started step whose worker went silent
    time_limit_grace: float = 0.0  # a started step's limit: its timeout + this
    queue_timeout: float | None = None  # how long a step may wait for a worker (None: ever)
    # an untimed step's message no worker began is sent again this long after (None: never)
    untimed_resend: float | None = None
    # a begun untimed step is silent this long after its worker's last heartbeat (None: never)
    heartbeat_lease: float | None = None
