"""The seams: the records the store hands out, and the store/dispatcher interfaces.

The coordinator and the scanner only talk to these; SQLAlchemy and Celery sit behind them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from celery_sagas.definition import idempotency_key
from celery_sagas.machine import (
    FORWARD_STATES,
    Decision,
    ErrorKind,
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


@dataclass(frozen=True)
class TransitionRecord:
    saga_id: str
    at: datetime
    step: str | None
    old: str
    new: str
    reason: str | None = None
    actor: str = "coordinator"


STARTED = "started"  # guard outcome while an execution is under way


def current_execution_key(record: SagaRecord) -> str:
    """The guard key of what the saga is waiting for: its current action or compensation."""
    role = "compensation" if record.state == SagaState.COMPENSATING else "action"
    return idempotency_key(record.saga_id, record.steps[record.current_step].name, role)


@dataclass(frozen=True)
class Expectation:
    """What a step message claims: that the saga waits for step ``step``'s ``role``
    (``action`` | ``compensation``) under attempt ``token``. A worker marks the step
    started, and runs it, only if the saga says so (``expects``)."""

    step: int
    token: int
    role: str
    definition: str | None = None  # the fingerprint of the definition the worker runs

    @property
    def states(self) -> frozenset[SagaState]:
        return FORWARD_STATES if self.role == "action" else frozenset({SagaState.COMPENSATING})


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
    ``saga_id:step:action|compensation``; ``outcome`` is ``ok``, ``business`` or ``error``."""

    key: str
    outcome: str
    result: Any = None
    error: str | None = None
    recorded_at: datetime | None = None


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


class Claim(Protocol):
    """Sagas claimed by a scan, locked until the claim's transaction ends
    (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite serialises writers)."""

    records: tuple[SagaRecord, ...]

    def commit(
        self,
        saga: SagaRecord,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
    ) -> tuple[OutboxMessage, ...]: ...


class SagaStore(Protocol):
    def create(
        self,
        new: NewSaga,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
    ) -> CreateResult:
        """Insert the saga, its steps, the log and the outbox in one transaction.
        The same business key with the same payload returns the existing saga
        (``created=False``); with another payload raises ``PayloadConflictError``."""
        ...

    def load(self, saga_id: str) -> SagaRecord | None: ...

    def find(self, ref: str) -> SagaRecord | None:
        """By saga id, or else by business key (the newest saga with that key)."""
        ...

    def commit(
        self,
        saga: SagaRecord,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
    ) -> tuple[OutboxMessage, ...]:
        """Apply an accepted decision with a compare-and-set on ``saga.version``: state,
        step changes, transition log and outbox rows in one transaction. Raises
        ``ConcurrentUpdateError`` if the saga changed since it was loaded."""
        ...

    def migrate(
        self,
        saga: SagaRecord,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
    ) -> tuple[OutboxMessage, ...]:
        """Replace the saga's definition and step rows by ``saga``'s (a move onto another
        version of its definition) and commit ``decision``, in one transaction gated on
        ``saga.version`` (``ConcurrentUpdateError`` if it changed)."""
        ...

    def write(
        self,
        saga: SagaRecord,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
        guard: GuardRecord | None = None,
    ) -> tuple[OutboxMessage, ...]:
        """Commit an accepted ``decision`` taken on ``saga`` (as read): state, step
        changes, transition log, outbox rows and, with ``guard``, the step outcome behind
        it, atomically and gated on ``saga.version`` (``ConcurrentUpdateError`` if the saga
        changed since: load and decide again)."""
        ...

    def mark_sent(self, message_ids: Sequence[int], now: datetime) -> None: ...

    def unsent(self, created_before: datetime, limit: int) -> tuple[OutboxMessage, ...]:
        """Messages never published nor consumed (no worker took their key), created
        before ``created_before``: what the relay must publish."""
        ...

    def get_guard(self, key: str) -> GuardRecord | None: ...

    def begin_step(
        self, key: str, saga_id: str, now: datetime, expectation: Expectation
    ) -> tuple[GuardRecord | None, SagaRecord | None]:
        """A snapshot of the saga (``load``) and, only if it ``expects`` this message,
        ``begin_guard`` on the same snapshot, in one round trip where the store can.
        A message the saga does not expect (or an unknown saga) writes nothing."""
        ...

    def begin_guard(self, key: str, now: datetime) -> GuardRecord | None:
        """Before running: mark the execution started (now: a marker already there gets
        this start time). Returns the recorded final outcome if there is one (a duplicate
        delivery), else None (go ahead and run)."""
        ...

    def put_guard(self, guard: GuardRecord, now: datetime) -> GuardRecord:
        """Record a final outcome once; returns whichever record won."""
        ...

    def list_sagas(
        self,
        state: SagaState | None = None,
        name: str | None = None,
        limit: int = 100,
        created_before: datetime | None = None,
        unfinished: bool = False,
    ) -> tuple[SagaRecord, ...]: ...

    def count_by_state(self) -> Mapping[str, int]: ...

    def transitions(self, saga_id: str) -> tuple[TransitionRecord, ...]: ...

    # -- failed attempts and the dead-letter queue --

    def record_attempt(
        self, saga_id: str, key: str, attempt: int, error: str, now: datetime
    ) -> None: ...

    def attempts(self, key: str) -> tuple[AttemptRecord, ...]: ...

    def dead_letters(
        self, saga_id: str | None = None, status: str | None = None, limit: int = 100
    ) -> tuple[DeadLetterRecord, ...]:
        """Oldest first; ``status="open"`` means dead or retrying, ``"all"`` any status."""
        ...

    def dead_letter(self, entry_id: int) -> DeadLetterRecord | None: ...

    def dead_letter_for(self, saga_id: str, step: int) -> DeadLetterRecord | None: ...

    def claim_auto_retry(self, entry: DeadLetterRecord, next_at: datetime) -> bool:
        """Count one automatic retry of a dead entry (compare-and-set); False if another
        recovery worker or an operator got there first."""
        ...

    # -- retention --

    def prunable(self, finished_before: datetime, name: str | None = None) -> int:
        """How many sagas ``prune`` would delete now."""
        ...

    def prune(
        self,
        finished_before: datetime,
        limit: int,
        name: str | None = None,
        after: tuple[datetime, str] | None = None,
    ) -> Pruned:
        """Delete up to ``limit`` sagas COMPLETED or FAILED before ``finished_before``
        (of type ``name``), without an open dead letter, with every row they own, in one
        short transaction; locked sagas are skipped. ``after``: the previous batch's
        ``Pruned.after`` (sagas are taken in ``(created_at, saga_id)`` order). Sent
        outbox rows sent before ``finished_before`` go too (a sent row is never read)."""
        ...

    def compact(self, finished_before: datetime, limit: int, now: datetime) -> Compacted:
        """Delete what can never be needed again: the guards of up to ``limit`` sagas
        that finished before ``finished_before`` (their messages are ignored before any
        guard is read; a saga with an unsent outbox row keeps them), and up to ``limit``
        times ``SENT_ROWS_PER_SAGA`` outbox rows sent before it. Off the step path: the
        scan runs it."""
        ...

    # -- what the scanner needs --

    def claim_due(self, now: datetime, limit: int) -> AbstractContextManager[Claim]:
        """Live sagas whose ``due_at`` has passed, oldest first, locked."""
        ...

    def claim_waiting(self, name: str, max_concurrent: int) -> AbstractContextManager[Claim]:
        """Sagas of ``name`` waiting for admission, as many as there are free slots,
        oldest first; the count and the claim are one atomic step."""
        ...

    def waiting_names(self) -> tuple[str, ...]: ...

    def report_stuck(
        self, older_than: datetime, now: datetime, limit: int
    ) -> tuple[SagaRecord, ...]:
        """Unfinished sagas created before ``older_than`` not reported yet; marks them
        reported, so each is returned once."""
        ...


class Dispatcher(Protocol):
    def send(self, message: OutboxMessage) -> None:
        """Publish one outbox message to the broker."""
        ...


class Clock(Protocol):
    def __call__(self) -> datetime: ...
