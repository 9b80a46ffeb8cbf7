"""The seams: the store interfaces, split by the role that uses them, and the dispatcher.

The coordinator and the scanner only talk to these; SQLAlchemy and Celery sit behind them.
The records they hand out are in ``celery_sagas.records`` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Protocol

from celery_sagas.machine import Decision, SagaState
from celery_sagas.records import (
    FINISHED_COMPENSATION,
    FINISHED_FORWARD,
    PRUNED_TABLES,
    SENT_ROWS_PER_SAGA,
    STARTED,
    AttemptRecord,
    Compacted,
    CreateResult,
    DeadLetterRecord,
    Expectation,
    GuardOutcome,
    GuardRecord,
    NewSaga,
    OutboxMessage,
    Pruned,
    SagaRecord,
    StepRecord,
    TransitionRecord,
    current_execution_key,
    expects,
    same_definition,
    step_values,
)

__all__ = [
    "FINISHED_COMPENSATION",
    "FINISHED_FORWARD",
    "PRUNED_TABLES",
    "SENT_ROWS_PER_SAGA",
    "STARTED",
    "AttemptRecord",
    "Claim",
    "Clock",
    "Compacted",
    "CreateResult",
    "DeadLetterRecord",
    "DeadLetterStore",
    "Dispatcher",
    "Expectation",
    "GuardOutcome",
    "GuardRecord",
    "GuardStore",
    "NewSaga",
    "OutboxMessage",
    "OutboxStore",
    "Pruned",
    "RetentionStore",
    "SagaBrowsing",
    "SagaRecord",
    "SagaStore",
    "SagaWrites",
    "ScanStore",
    "StepRecord",
    "TransitionRecord",
    "current_execution_key",
    "expects",
    "same_definition",
    "step_values",
]


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


class SagaWrites(Protocol):
    """Sagas created, read and changed: the coordinator's side."""

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


class OutboxStore(Protocol):
    """The outbox: what the relay publishes after commit and marks sent."""

    def mark_sent(self, message_ids: Sequence[int], now: datetime) -> None: ...

    def unsent(self, created_before: datetime, limit: int) -> tuple[OutboxMessage, ...]:
        """Messages never published nor consumed (no worker took their key), created
        before ``created_before``: what the relay must publish."""
        ...


class GuardStore(Protocol):
    """Idempotency guards: the step path's check before and record after a participant."""

    def get_guard(self, key: str) -> GuardRecord | None: ...

    def begin_step(
        self,
        key: str,
        saga_id: str,
        now: datetime,
        expectation: Expectation,
        delivery: str | None = None,
    ) -> tuple[GuardRecord | None, SagaRecord | None]:
        """A snapshot of the saga (``load``) and, only if it ``expects`` this message,
        ``begin_guard`` on the same snapshot, in one round trip where the store can.
        A message the saga does not expect (or an unknown saga) writes nothing."""
        ...

    def begin_guard(
        self, key: str, now: datetime, delivery: str | None = None
    ) -> GuardRecord | None:
        """Before running: mark the execution started (now: a marker already there gets
        this start time and ``delivery``, the Celery task id of the message running it,
        kept as the marker's ``result``). Returns the recorded final outcome if there is
        one (a duplicate delivery), else None (go ahead and run)."""
        ...

    def put_guard(self, guard: GuardRecord, now: datetime) -> GuardRecord:
        """Record a final outcome once; returns whichever record won."""
        ...

    def hand_over_started(self, key: str, delivery: str, to: str | None = None) -> bool:
        """The ``started`` marker of ``key`` that names ``delivery`` names ``to`` instead;
        with ``to=None`` it is deleted (the step is then sent but not begun: the relay
        and the scanner treat it as such). False if no such marker (a final outcome, or
        another delivery's marker, stays)."""
        ...

    def beat_started(self, markers: Mapping[str, str | None], at: datetime) -> int:
        """A heartbeat: the ``started`` markers of ``markers`` (key → the delivery that
        holds it; None: whichever) take ``at`` as the time their worker was last heard
        from. A marker another delivery took over, or a final outcome, is left as it is.
        Returns how many markers were refreshed."""
        ...


class SagaBrowsing(Protocol):
    """What the CLI, the Sagas page and the metrics read."""

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


class DeadLetterStore(Protocol):
    """Failed attempts and the dead-letter queue."""

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


class RetentionStore(Protocol):
    """Deleting what finished sagas no longer need (``celery-sagas prune``, the scan's
    compaction)."""

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


class ScanStore(Protocol):
    """What beat's scanner claims and marks."""

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


class SagaStore(
    SagaWrites,
    OutboxStore,
    GuardStore,
    SagaBrowsing,
    DeadLetterStore,
    RetentionStore,
    ScanStore,
    Protocol,
):
    """Everything a saga store provides (the SQL store and the in-memory fake); a part
    of the engine that needs only one role asks for that role's interface."""


class Dispatcher(Protocol):
    def send(self, message: OutboxMessage) -> None:
        """Publish one outbox message to the broker."""
        ...


class Clock(Protocol):
    def __call__(self) -> datetime: ...
