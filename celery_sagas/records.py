"""The records the store hands out (frozen dataclasses) and the pure rules over them.

The store interfaces that hand them out are in ``celery_sagas.protocols``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from celery_sagas.definition import idempotency_key
from celery_sagas.machine import (
    FORWARD_STATES,
    ErrorKind,
    Role,
    SagaState,
    SagaView,
    StepChange,
    StepStatus,
    StepView,
)


@dataclass(frozen=True)
class StepRecord:
    index: int
    name: str
    status: StepStatus
    attempts: int = 0
    compensation_attempts: int = 0
    result: Any = None
    error: str | None = None
    error_kind: ErrorKind | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    compensation_started_at: datetime | None = None
    compensation_finished_at: datetime | None = None
    deadline_at: datetime | None = None
    redispatch_at: datetime | None = None
    dispatches: int = 0
    started: bool = False  # a worker began executing the current send (scans only)
    began_at: datetime | None = None  # when a worker last began it (scans only)


FINISHED_FORWARD = (StepStatus.COMPLETED, StepStatus.FAILED, StepStatus.TIMED_OUT)
FINISHED_COMPENSATION = (StepStatus.COMPENSATED, StepStatus.COMPENSATION_FAILED)


def step_values(change: StepChange, now: datetime) -> dict[str, Any]:
    """The fields one step status change sets (timestamps follow the status): the one
    rule both stores apply, the SQL store as column values, the fake on its records."""
    values: dict[str, Any] = {"status": change.new}
    if change.has_result:
        values["result"] = change.result
    if change.error is not None:
        values["error"] = change.error
    if change.error_kind is not None:
        values["error_kind"] = change.error_kind
    for timing in ("deadline_at", "redispatch_at", "dispatches"):
        if getattr(change, timing) is not None:
            values[timing] = getattr(change, timing)
    if change.new not in (StepStatus.RUNNING, StepStatus.COMPENSATING):
        values.update(deadline_at=None, redispatch_at=None)
    if change.new == StepStatus.RUNNING and change.old != StepStatus.RUNNING:
        values["started_at"] = now
        values["finished_at"] = None
    elif change.new in FINISHED_FORWARD:
        values["finished_at"] = now
        if change.attempts is not None:
            values["attempts"] = change.attempts
    elif change.new == StepStatus.COMPENSATING:
        values["compensation_started_at"] = now
    elif change.new in FINISHED_COMPENSATION:
        values["compensation_finished_at"] = now
        if change.attempts is not None:
            values["compensation_attempts"] = change.attempts
    return values


@dataclass(frozen=True)
class SagaRecord:
    saga_id: str
    name: str
    business_key: str
    state: SagaState
    current_step: int
    token: int
    version: int
    payload: Mapping[str, Any]
    created_at: datetime
    updated_at: datetime
    reason: str | None = None
    finished_at: datetime | None = None
    deadline_at: datetime | None = None
    due_at: datetime | None = None
    admitted: bool = True
    definition: str | None = None  # the fingerprint of the definition it started with
    steps: tuple[StepRecord, ...] = ()

    def view(self, timeouts: Sequence[float | None] = (), max_redispatches: int = 2) -> SagaView:
        """The machine's view; ``timeouts`` are the steps' timeouts in seconds."""
        timeouts = tuple(timeouts) or (None,) * len(self.steps)
        return SagaView(
            saga_id=self.saga_id,
            name=self.name,
            state=self.state,
            current_step=self.current_step,
            token=self.token,
            steps=tuple(
                StepView(
                    s.index,
                    s.name,
                    s.status,
                    s.error_kind,
                    timeout=timeouts[s.index],
                    deadline_at=s.deadline_at,
                    redispatch_at=s.redispatch_at,
                    dispatches=s.dispatches,
                    started=s.started,
                    began_at=s.began_at,
                )
                for s in self.steps
            ),
            deadline_at=self.deadline_at,
            max_redispatches=max_redispatches,
        )

    def results(self) -> dict[str, Any]:
        """Results of the completed steps, by step name."""
        return {s.name: s.result for s in self.steps if s.status == StepStatus.COMPLETED}


@dataclass(frozen=True)
class NewSaga:
    saga_id: str
    name: str
    business_key: str
    payload: Mapping[str, Any]
    payload_hash: str
    step_names: tuple[str, ...]
    deadline_at: datetime | None = None
    definition: str | None = None  # the definition's fingerprint


@dataclass(frozen=True)
class OutboxMessage:
    """A message to publish after commit. ``body`` alone is enough to publish it."""

    saga_id: str
    body: Mapping[str, Any]
    id: int | None = None
    created_at: datetime | None = None
    sent_at: datetime | None = None


COORDINATOR = "coordinator"  # the transition log's actor when a decision names none


@dataclass(frozen=True)
class TransitionRecord:
    saga_id: str
    at: datetime
    step: str | None
    old: str
    new: str
    reason: str | None = None
    actor: str = COORDINATOR


class GuardOutcome(StrEnum):
    """What a step guard row says: an execution is under way (``started``), or the final
    outcome of the step or compensation. The values are the guard table's strings."""

    STARTED = "started"  # not an outcome yet: a worker began it (or holds a hook's claim)
    OK = "ok"
    BUSINESS = "business"  # declined: it did not act
    ERROR = "error"  # failed: it may have acted


STARTED = GuardOutcome.STARTED  # guard outcome while an execution is under way


def current_execution_key(record: SagaRecord) -> str:
    """The guard key of what the saga is waiting for: its current action or compensation."""
    role = Role.COMPENSATION if record.state == SagaState.COMPENSATING else Role.ACTION
    return idempotency_key(record.saga_id, record.steps[record.current_step].name, role)


# the saga states in which a step message of each role is expected (``expects``)
EXPECTED_STATES: dict[Role, frozenset[SagaState]] = {
    Role.ACTION: FORWARD_STATES,
    Role.COMPENSATION: frozenset({SagaState.COMPENSATING}),
}


@dataclass(frozen=True)
class Expectation:
    """What a step message claims: that the saga waits for step ``step``'s ``role``
    (its action or its compensation) under attempt ``token``. A worker marks the step
    started, and runs it, only if the saga says so (``expects``)."""

    step: int
    token: int
    role: Role
    definition: str | None = None  # the fingerprint of the definition the worker runs

    @property
    def states(self) -> frozenset[SagaState]:
        return EXPECTED_STATES[self.role]


def expects(record: SagaRecord | None, expectation: Expectation) -> bool:
    """True if ``record`` is live and waits for exactly this step, role and token, under
    the definition the worker runs."""
    return (
        record is not None
        and record.state in expectation.states
        and record.current_step == expectation.step
        and record.token == expectation.token
        and same_definition(record, expectation.definition)
    )


def same_definition(record: SagaRecord, definition: str | None) -> bool:
    """The saga started with ``definition`` (a saga from before fingerprints: any)."""
    return definition is None or record.definition in (None, definition)


@dataclass(frozen=True)
class GuardRecord:
    """The recorded outcome of one step or compensation: ``key`` is
    ``saga_id:step:action|compensation``. A store may pass ``outcome`` as its column's
    string: it is turned into the enum here (an unknown one raises ``ValueError``)."""

    key: str
    outcome: GuardOutcome
    result: Any = None
    error: str | None = None
    recorded_at: datetime | None = None

    def __post_init__(self) -> None:
        if type(self.outcome) is not GuardOutcome:
            object.__setattr__(self, "outcome", GuardOutcome(self.outcome))


@dataclass(frozen=True)
class DeadLetterRecord:
    """A compensation that exhausted its retries. ``status``: dead, retrying (an operator
    re-ran it), resolved (the re-run succeeded), discarded (fixed by hand)."""

    id: int
    saga_id: str
    saga_name: str
    step: int
    step_name: str
    task_name: str
    status: str
    attempts: int
    deaths: int
    error: str | None
    traceback: str | None
    payload: Any
    created_at: datetime
    updated_at: datetime
    resolved_at: datetime | None = None
    resolution: str | None = None
    auto_retries: int = 0
    next_auto_retry_at: datetime | None = None


@dataclass(frozen=True)
class AttemptRecord:
    """One failed attempt of a step or compensation (successes are in the guard)."""

    saga_id: str
    key: str
    attempt: int
    at: datetime
    error: str


@dataclass(frozen=True)
class CreateResult:
    record: SagaRecord
    created: bool
    messages: tuple[OutboxMessage, ...] = field(default_factory=tuple)


# the tables a saga's rows live in, in the order pruning deletes them
PRUNED_TABLES = (
    "saga_guard",
    "saga_attempt",
    "saga_outbox",
    "saga_dead_letter",
    "saga_transition",
    "saga_step",
    "saga_reaction",
    "saga_event",
    "saga",
)


# a retention pass over ``limit`` sagas deletes up to this many sent outbox rows per saga
# (a saga writes one per step and hook), so it keeps up with the sagas that finish
SENT_ROWS_PER_SAGA = 8


@dataclass(frozen=True)
class Pruned:
    """One batch of ``prune``: the sagas deleted, the rows deleted per table, and where the
    next batch starts (``after``: the ``(created_at, saga_id)`` of the last saga taken;
    None when this batch took none, so there is nothing left)."""

    sagas: int
    rows: Mapping[str, int]
    after: tuple[datetime, str] | None


@dataclass(frozen=True)
class Compacted:
    """One pass of ``compact``: finished sagas whose guards were deleted, guard rows and
    sent outbox rows deleted."""

    sagas: int = 0
    guards: int = 0
    outbox: int = 0
