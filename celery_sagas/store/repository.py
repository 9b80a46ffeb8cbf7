"""``SqlSagaStore``: the ``SagaStore`` seam on SQLAlchemy Core (PostgreSQL and SQLite).

Every write method is one transaction. Saga updates are a compare-and-set on ``version``
(works on SQLite, where ``FOR UPDATE`` is ignored).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, Table, false, func, select, true, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError

from celery_sagas.errors import (
    ConcurrentUpdateError,
    PayloadConflictError,
    SagaError,
    StoreUnavailableError,
)
from celery_sagas.machine import (
    LIVE_STATES,
    TERMINAL_STATES,
    Decision,
    ErrorKind,
    SagaState,
    StepChange,
    StepStatus,
)
from celery_sagas.protocols import (
    STARTED,
    AttemptRecord,
    CreateResult,
    DeadLetterRecord,
    Decide,
    GuardRecord,
    NewSaga,
    OutboxMessage,
    SagaRecord,
    StepRecord,
    TransitionRecord,
    current_execution_key,
)
from celery_sagas.settings import redact_url
from celery_sagas.store import dead_letters as dead_letter_rows
from celery_sagas.store.engine import shared_engine
from celery_sagas.store.tables import (
    attempts,
    dead_letters,
    guards,
    outbox,
    sagas,
    steps,
    transitions,
)

FINISHED_FORWARD = (StepStatus.COMPLETED, StepStatus.FAILED, StepStatus.TIMED_OUT)
FINISHED_COMPENSATION = (StepStatus.COMPENSATED, StepStatus.COMPENSATION_FAILED)


def step_values(change: StepChange, now: datetime) -> dict[str, Any]:
    """Column values for one step status change (timestamps follow the status)."""
    values: dict[str, Any] = {"status": change.new.value}
    if change.has_result:
        values["result"] = change.result
    if change.error is not None:
        values["error"] = change.error
    if change.error_kind is not None:
        values["error_kind"] = change.error_kind.value
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


def _step_record(row: Any) -> StepRecord:
    return StepRecord(
        index=row.idx,
        name=row.name,
        status=StepStatus(row.status),
        attempts=row.attempts,
        compensation_attempts=row.compensation_attempts,
        result=row.result,
        error=row.error,
        error_kind=ErrorKind(row.error_kind) if row.error_kind else None,
        started_at=row.started_at,
        finished_at=row.finished_at,
        compensation_started_at=row.compensation_started_at,
        compensation_finished_at=row.compensation_finished_at,
        deadline_at=row.deadline_at,
        redispatch_at=row.redispatch_at,
        dispatches=row.dispatches,
    )


def _saga_record(row: Any, step_rows: Sequence[Any] = ()) -> SagaRecord:
    return SagaRecord(
        saga_id=row.id,
        name=row.name,
        business_key=row.business_key,
        state=SagaState(row.state),
        current_step=row.current_step,
        token=row.token,
        version=row.version,
        payload=row.payload,
        created_at=row.created_at,
        updated_at=row.updated_at,
        reason=row.reason,
        finished_at=row.finished_at,
        deadline_at=row.deadline_at,
        due_at=row.due_at,
        admitted=row.admitted,
        steps=tuple(_step_record(r) for r in step_rows),
    )


class SqlSagaStore:
    """The saga store on PostgreSQL (``postgresql+psycopg2://``) or SQLite."""

    def __init__(self, url_or_engine: str | Engine, **engine_options: Any) -> None:
        if isinstance(url_or_engine, str):
            self.engine = shared_engine(url_or_engine, **engine_options)
        else:
            self.engine = url_or_engine
        self.is_postgres = self.engine.dialect.name == "postgresql"

    def __repr__(self) -> str:
        return f"SqlSagaStore({redact_url(str(self.engine.url))})"

    # -- helpers ------------------------------------------------------------------

    def _insert(self, table: Table) -> Any:
        """An INSERT with ``on_conflict_do_nothing`` for this backend."""
        dialect_module = postgresql if self.is_postgres else sqlite
        return dialect_module.insert(table)

    @contextmanager
    def _unavailable_as_error(self) -> Iterator[None]:
        """A lost or unreachable database becomes ``StoreUnavailableError``."""
        try:
            yield
        except (OperationalError, InterfaceError) as exc:
            raise StoreUnavailableError(
                f"cannot reach the saga database {redact_url(str(self.engine.url))}: {exc.orig}"
            ) from exc

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        """One write transaction."""
        with self._unavailable_as_error(), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._unavailable_as_error(), self.engine.connect() as conn:
            yield conn

    def _write_decision(
        self,
        conn: Connection,
        saga_id: str,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
        fresh: bool = False,
    ) -> tuple[OutboxMessage, ...]:
        for change in decision.step_changes:
            conn.execute(
                update(steps)
                .where(steps.c.saga_id == saga_id, steps.c.idx == change.index)
                .values(**step_values(change, now))
            )
        if decision.transitions:
            conn.execute(
                transitions.insert(),
                [
                    {
                        "saga_id": saga_id,
                        "at": now,
                        "step": t.step,
                        "old": t.old,
                        "new": t.new,
                        "reason": t.reason,
                        "actor": decision.actor or "coordinator",
                    }
                    for t in decision.transitions
                ],
            )
        if decision.dead_letter is not None:
            dead_letter_rows.write_change(
                conn, self._insert(dead_letters), saga_id, decision.dead_letter, now
            )
        if not fresh:
            # The saga moved on, so the messages that moved it were delivered: the relay
            # must not republish them.
            conn.execute(
                update(outbox)
                .where(outbox.c.saga_id == saga_id, outbox.c.sent_at.is_(None))
                .values(sent_at=now)
            )
        written = []
        for message in messages:
            new_id = conn.execute(
                outbox.insert()
                .values(
                    saga_id=saga_id,
                    body=dict(message.body),
                    created_at=now,
                    key=message.body.get("key"),
                )
                .returning(outbox.c.id)
            ).scalar_one()
            written.append(OutboxMessage(saga_id, message.body, id=new_id, created_at=now))
        return tuple(written)

    # -- SagaStore ------------------------------------------------------------------

    def create(
        self,
        new: NewSaga,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
    ) -> CreateResult:
        assert decision.state is not None
        try:
            return self._create(new, decision, messages, now)
        except IntegrityError as exc:
            raise SagaError(
                f"cannot create saga {new.saga_id}: {exc.orig}; nothing was written",
                saga_id=new.saga_id,
            ) from exc

    def _create(
        self,
        new: NewSaga,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
    ) -> CreateResult:
        assert decision.state is not None
        with self._connect() as conn:
            inserted = conn.execute(
                self._insert(sagas)
                .values(
                    id=new.saga_id,
                    name=new.name,
                    business_key=new.business_key,
                    payload=dict(new.payload),
                    payload_hash=new.payload_hash,
                    state=decision.state.value,
                    current_step=decision.current_step,
                    token=decision.token,
                    version=1,
                    created_at=now,
                    updated_at=now,
                    deadline_at=new.deadline_at,
                    due_at=decision.due_at,
                    admitted=decision.admitted,
                )
                # any conflict: the business key, or the same start delivered twice (its
                # task id is the saga id)
                .on_conflict_do_nothing()
            )
            if inserted.rowcount == 0:
                existing = conn.execute(
                    select(sagas.c.id, sagas.c.payload_hash).where(
                        sagas.c.name == new.name, sagas.c.business_key == new.business_key
                    )
                ).one_or_none()
                if existing is None:
                    raise SagaError(
                        f"saga id {new.saga_id} is already used by another saga; "
                        "nothing was written",
                        saga_id=new.saga_id,
                    )
                if existing.payload_hash != new.payload_hash:
                    raise PayloadConflictError(
                        f"{new.name} {new.business_key!r} was already started with a "
                        f"different payload (saga {existing.id}); nothing was written",
                        saga_id=existing.id,
                        business_key=new.business_key,
                    )
                saga_id = existing.id
                created = False
                written: tuple[OutboxMessage, ...] = ()
            else:
                conn.execute(
                    steps.insert(),
                    [
                        {"saga_id": new.saga_id, "idx": i, "name": name, "status": "pending"}
                        for i, name in enumerate(new.step_names)
                    ],
                )
                written = self._write_decision(
                    conn, new.saga_id, decision, messages, now, fresh=True
                )
                return CreateResult(_fresh_record(new, decision, now), True, written)
        record = self.load(saga_id)
        assert record is not None
        return CreateResult(record=record, created=created, messages=written)

    def load(self, saga_id: str) -> SagaRecord | None:
        with self._read() as conn:
            row = conn.execute(select(sagas).where(sagas.c.id == saga_id)).one_or_none()
            if row is None:
                return None
            step_rows = conn.execute(
                select(steps).where(steps.c.saga_id == saga_id).order_by(steps.c.idx)
            ).all()
        return _saga_record(row, step_rows)

    def find(self, ref: str) -> SagaRecord | None:
        record = self.load(ref)
        if record is not None:
            return record
        with self._read() as conn:
            saga_id = conn.execute(
                select(sagas.c.id)
                .where(sagas.c.business_key == ref)
                .order_by(sagas.c.created_at.desc())
                .limit(1)
            ).scalar_one_or_none()
        return self.load(saga_id) if saga_id else None

    def _commit_in(
        self,
        conn: Connection,
        saga: SagaRecord,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
    ) -> tuple[OutboxMessage, ...]:
        assert decision.accepted and decision.state is not None
        values: dict[str, Any] = {
            "state": decision.state.value,
            "current_step": decision.current_step,
            "token": decision.token,
            "version": saga.version + 1,
            "updated_at": now,
            "due_at": decision.due_at,
        }
        if decision.reason is not None:
            values["reason"] = decision.reason
        if decision.state in TERMINAL_STATES:
            values["finished_at"] = now
        if decision.admitted:
            values["admitted"] = True
        changed = conn.execute(
            update(sagas)
            .where(sagas.c.id == saga.saga_id, sagas.c.version == saga.version)
            .values(**values)
        ).rowcount
        if changed != 1:
            raise ConcurrentUpdateError(
                f"saga {saga.saga_id} changed since version {saga.version}",
                saga_id=saga.saga_id,
            )
        return self._write_decision(conn, saga.saga_id, decision, messages, now)

    def commit(
        self,
        saga: SagaRecord,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
    ) -> tuple[OutboxMessage, ...]:
        with self._connect() as conn:
            return self._commit_in(conn, saga, decision, messages, now)

    def update(
        self, saga_id: str, decide: Decide, now: datetime
    ) -> tuple[SagaRecord | None, Decision | None, tuple[OutboxMessage, ...]]:
        """Load (locked), decide and write in one transaction: one connection, no race."""
        with self._connect() as conn:
            row = conn.execute(
                self._for_update(select(sagas).where(sagas.c.id == saga_id))
            ).one_or_none()
            if row is None:
                return None, None, ()
            step_rows = conn.execute(
                select(steps).where(steps.c.saga_id == saga_id).order_by(steps.c.idx)
            ).all()
            record = _saga_record(row, step_rows)
            decision, messages = decide(record)
            if not decision.accepted:
                return record, decision, ()
            return record, decision, self._commit_in(conn, record, decision, messages, now)

    def _for_update(self, query: Any) -> Any:
        return query.with_for_update() if self.is_postgres else query

    # -- scanning ---------------------------------------------------------------------

    def _records(self, conn: Connection, rows: Sequence[Any]) -> tuple[SagaRecord, ...]:
        if not rows:
            return ()
        by_saga: dict[str, list[Any]] = {}
        step_rows = conn.execute(
            select(steps)
            .where(steps.c.saga_id.in_([r.id for r in rows]))
            .order_by(steps.c.saga_id, steps.c.idx)
        )
        for step_row in step_rows:
            by_saga.setdefault(step_row.saga_id, []).append(step_row)
        records = tuple(_saga_record(r, by_saga.get(r.id, [])) for r in rows)
        return self._with_started_flags(conn, records)

    def _with_started_flags(
        self, conn: Connection, records: tuple[SagaRecord, ...]
    ) -> tuple[SagaRecord, ...]:
        """Mark each current step a worker is executing right now (its guard says
        ``started``). The scanner re-sends the others: a message that never reached a
        worker, or a reply lost after the outcome was recorded (the guard answers it)."""
        keys = {r.saga_id: current_execution_key(r) for r in records}
        in_progress = select(guards.c.key).where(
            guards.c.key.in_(list(keys.values())), guards.c.outcome == STARTED
        )
        found = set(conn.execute(in_progress).scalars().all())
        return tuple(
            replace(
                r,
                steps=tuple(
                    replace(s, started=keys[r.saga_id] in found) if s.index == r.current_step else s
                    for s in r.steps
                ),
            )
            for r in records
        )

    def _locked(self, query: Any) -> Any:
        return query.with_for_update(skip_locked=True) if self.is_postgres else query

    @contextmanager
    def claim_due(self, now: datetime, limit: int) -> Iterator[SqlClaim]:
        with self._connect() as conn:
            rows = conn.execute(
                self._locked(
                    select(sagas)
                    .where(sagas.c.due_at.is_not(None), sagas.c.due_at <= now)
                    .order_by(sagas.c.due_at)
                    .limit(limit)
                )
            ).all()
            yield SqlClaim(self, conn, self._records(conn, rows))

    @contextmanager
    def claim_waiting(self, name: str, max_concurrent: int) -> Iterator[SqlClaim]:
        with self._connect() as conn:
            if self.is_postgres:  # one admitter per saga type at a time
                conn.execute(select(func.pg_advisory_xact_lock(_lock_key(name))))
            running = conn.execute(
                select(func.count())
                .select_from(sagas)
                .where(
                    sagas.c.name == name,
                    sagas.c.admitted.is_(true()),
                    sagas.c.state.in_([s.value for s in LIVE_STATES]),
                )
            ).scalar_one()
            free = max(0, max_concurrent - running)
            rows = (
                conn.execute(
                    select(sagas)
                    .where(
                        sagas.c.name == name,
                        sagas.c.admitted.is_(false()),
                        sagas.c.state == SagaState.STARTED.value,
                    )
                    .order_by(sagas.c.created_at, sagas.c.id)
                    .limit(free)
                ).all()
                if free
                else []
            )
            yield SqlClaim(self, conn, self._records(conn, rows))

    def waiting_names(self) -> tuple[str, ...]:
        with self._read() as conn:
            names = conn.execute(
                select(sagas.c.name)
                .where(sagas.c.admitted.is_(false()), sagas.c.state == SagaState.STARTED.value)
                .distinct()
            ).scalars()
            return tuple(names)

    def report_stuck(
        self, older_than: datetime, now: datetime, limit: int
    ) -> tuple[SagaRecord, ...]:
        with self._connect() as conn:
            rows = conn.execute(
                self._locked(
                    select(sagas)
                    .where(
                        sagas.c.finished_at.is_(None),
                        sagas.c.created_at < older_than,
                        sagas.c.stuck_reported_at.is_(None),
                    )
                    .order_by(sagas.c.created_at)
                    .limit(limit)
                )
            ).all()
            if rows:
                conn.execute(
                    update(sagas)
                    .where(sagas.c.id.in_([r.id for r in rows]))
                    .values(stuck_reported_at=now)
                )
            return tuple(_saga_record(r) for r in rows)

    def mark_sent(self, message_ids: Sequence[int], now: datetime) -> None:
        if not message_ids:
            return
        with self._connect() as conn:
            if self.is_postgres:
                # Losing this mark only means a harmless duplicate publish by the relay.
                conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
            conn.execute(
                update(outbox)
                .where(outbox.c.id.in_(list(message_ids)), outbox.c.sent_at.is_(None))
                .values(sent_at=now)
            )

    def unsent(self, created_before: datetime, limit: int) -> tuple[OutboxMessage, ...]:
        taken = select(guards.c.key).where(guards.c.key == outbox.c.key).exists()
        with self._read() as conn:
            rows = conn.execute(
                select(outbox)
                .where(
                    outbox.c.sent_at.is_(None),
                    outbox.c.created_at < created_before,
                    ~taken,
                )
                .order_by(outbox.c.id)
                .limit(limit)
            ).all()
        return tuple(
            OutboxMessage(r.saga_id, r.body, id=r.id, created_at=r.created_at) for r in rows
        )

    def get_guard(self, key: str) -> GuardRecord | None:
        with self._read() as conn:
            row = conn.execute(select(guards).where(guards.c.key == key)).one_or_none()
        return _guard_record(row) if row else None

    def begin_guard(self, key: str, now: datetime) -> GuardRecord | None:
        with self._connect() as conn:
            if self.is_postgres:
                # Losing this marker only means the scanner may re-send a running step.
                conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
            inserted = conn.execute(
                self._insert(guards)
                .values(key=key, outcome=STARTED, recorded_at=now)
                .on_conflict_do_nothing(index_elements=["key"])
            ).rowcount
            if inserted:
                return None
            row = conn.execute(select(guards).where(guards.c.key == key)).one()
        return None if row.outcome == STARTED else _guard_record(row)

    def put_guard(self, guard: GuardRecord, now: datetime) -> GuardRecord:
        values = {
            "outcome": guard.outcome,
            "result": guard.result,
            "error": guard.error,
            "recorded_at": now,
        }
        with self._connect() as conn:
            updated = conn.execute(
                update(guards)
                .where(guards.c.key == guard.key, guards.c.outcome == STARTED)
                .values(**values)
            ).rowcount
            if not updated:
                updated = conn.execute(
                    self._insert(guards)
                    .values(key=guard.key, **values)
                    .on_conflict_do_nothing(index_elements=["key"])
                ).rowcount
            if updated:
                return GuardRecord(guard.key, guard.outcome, guard.result, guard.error, now)
            row = conn.execute(select(guards).where(guards.c.key == guard.key)).one()
        return _guard_record(row)

    # -- failed attempts and the dead-letter queue ------------------------------------

    def record_attempt(
        self, saga_id: str, key: str, attempt: int, error: str, now: datetime
    ) -> None:
        try:
            with self._connect() as conn:
                conn.execute(
                    attempts.insert().values(
                        saga_id=saga_id, key=key, attempt=attempt, at=now, error=error
                    )
                )
        except IntegrityError as exc:
            raise SagaError(f"cannot record an attempt for saga {saga_id}: {exc.orig}") from exc

    def attempts(self, key: str) -> tuple[AttemptRecord, ...]:
        with self._read() as conn:
            return dead_letter_rows.attempt_rows(conn, key)

    def dead_letters(
        self, saga_id: str | None = None, status: str | None = None, limit: int = 100
    ) -> tuple[DeadLetterRecord, ...]:
        with self._read() as conn:
            rows = conn.execute(dead_letter_rows.query(saga_id, status, limit)).all()
        return tuple(dead_letter_rows.record(r) for r in rows)

    def dead_letter(self, entry_id: int) -> DeadLetterRecord | None:
        with self._read() as conn:
            row = conn.execute(
                select(dead_letters).where(dead_letters.c.id == entry_id)
            ).one_or_none()
        return dead_letter_rows.record(row) if row else None

    def dead_letter_for(self, saga_id: str, step: int) -> DeadLetterRecord | None:
        with self._read() as conn:
            row = conn.execute(dead_letter_rows.by_step(saga_id, step)).one_or_none()
        return dead_letter_rows.record(row) if row else None

    def claim_auto_retry(self, entry: DeadLetterRecord, next_at: datetime) -> bool:
        with self._connect() as conn:
            return dead_letter_rows.claim_auto_retry(conn, entry.id, entry.auto_retries, next_at)

    def list_sagas(
        self,
        state: SagaState | None = None,
        name: str | None = None,
        limit: int = 100,
        created_before: datetime | None = None,
        unfinished: bool = False,
    ) -> tuple[SagaRecord, ...]:
        query = select(sagas).order_by(sagas.c.created_at.desc(), sagas.c.id).limit(limit)
        if state is not None:
            query = query.where(sagas.c.state == state.value)
        if name is not None:
            query = query.where(sagas.c.name == name)
        if created_before is not None:
            query = query.where(sagas.c.created_at < created_before)
        if unfinished:
            query = query.where(sagas.c.finished_at.is_(None))
        with self._read() as conn:
            rows = conn.execute(query).all()
        return tuple(_saga_record(r) for r in rows)

    def count_by_state(self) -> Mapping[str, int]:
        with self._read() as conn:
            rows = conn.execute(select(sagas.c.state, func.count()).group_by(sagas.c.state)).all()
        return {state: count for state, count in rows}

    def transitions(self, saga_id: str) -> tuple[TransitionRecord, ...]:
        with self._read() as conn:
            rows = conn.execute(
                select(transitions)
                .where(transitions.c.saga_id == saga_id)
                .order_by(transitions.c.id)
            ).all()
        return tuple(
            TransitionRecord(r.saga_id, r.at, r.step, r.old, r.new, r.reason, r.actor) for r in rows
        )


def _fresh_record(new: NewSaga, decision: Decision, now: datetime) -> SagaRecord:
    """The record just inserted, without reading it back."""
    changed = {c.index: c for c in decision.step_changes}
    assert decision.state is not None
    now = now.astimezone(UTC)
    return SagaRecord(
        saga_id=new.saga_id,
        name=new.name,
        business_key=new.business_key,
        state=decision.state,
        current_step=decision.current_step,
        token=decision.token,
        version=1,
        payload=json.loads(json.dumps(new.payload)),
        created_at=now,
        updated_at=now,
        deadline_at=_utc(new.deadline_at),
        due_at=decision.due_at,
        admitted=decision.admitted,
        steps=tuple(
            StepRecord(
                index=i,
                name=name,
                status=changed[i].new if i in changed else StepStatus.PENDING,
                started_at=now if i in changed and changed[i].new == StepStatus.RUNNING else None,
                deadline_at=_utc(changed[i].deadline_at) if i in changed else None,
                redispatch_at=_utc(changed[i].redispatch_at) if i in changed else None,
                dispatches=(changed[i].dispatches or 0) if i in changed else 0,
            )
            for i, name in enumerate(new.step_names)
        ),
    )


def _utc(moment: datetime | None) -> datetime | None:
    return moment.astimezone(UTC) if moment else None


class SqlClaim:
    """Sagas locked by a scan; ``commit`` writes a decision in the claim's transaction."""

    def __init__(
        self, store: SqlSagaStore, conn: Connection, records: tuple[SagaRecord, ...]
    ) -> None:
        self._store = store
        self._conn = conn
        self.records = records

    def commit(
        self,
        saga: SagaRecord,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
    ) -> tuple[OutboxMessage, ...]:
        return self._store._commit_in(self._conn, saga, decision, messages, now)


def _lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for a saga type."""
    digest = hashlib.sha256(f"celery_sagas:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _guard_record(row: Any) -> GuardRecord:
    return GuardRecord(row.key, row.outcome, row.result, row.error, row.recorded_at)
