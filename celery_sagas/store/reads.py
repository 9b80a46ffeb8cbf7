"""The saga store's reads, the same on PostgreSQL and SQLite: each on one connection of
the store's engine, outside any write transaction."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime

from sqlalchemy import Connection, Engine, bindparam, func, select
from sqlalchemy.exc import InterfaceError, OperationalError

from celery_sagas import row_filters
from celery_sagas.errors import StoreUnavailableError
from celery_sagas.machine import SagaState
from celery_sagas.protocols import (
    AttemptRecord,
    DeadLetterRecord,
    GuardRecord,
    OutboxMessage,
    SagaRecord,
    TransitionRecord,
)
from celery_sagas.settings import redact_url
from celery_sagas.store import claims as claim_rows
from celery_sagas.store import dead_letters as dead_letter_rows
from celery_sagas.store import guards as guard_rows
from celery_sagas.store import retention
from celery_sagas.store.browse import with_business_key
from celery_sagas.store.filters import where
from celery_sagas.store.records import STEP_COLUMNS, _joined_record, _saga_record
from celery_sagas.store.tables import dead_letters, guards, outbox, sagas, steps, transitions

# the saga row and its steps in one round trip (built once: see ``one_statement``)
WITH_STEPS = (
    select(sagas, *STEP_COLUMNS)
    .join(steps, steps.c.saga_id == sagas.c.id)
    .where(sagas.c.id == bindparam("p_saga_id"))
    .order_by(steps.c.idx)
)


class SqlReads:
    """Reads of the saga tables through ``engine``; a lost database is
    ``StoreUnavailableError``."""

    engine: Engine

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact_url(str(self.engine.url))})"

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
    def _read(self) -> Iterator[Connection]:
        with self._unavailable_as_error(), self.engine.connect() as conn:
            yield conn

    # -- sagas ------------------------------------------------------------------------

    def load(self, saga_id: str) -> SagaRecord | None:
        with self._read() as conn:
            row = conn.execute(select(sagas).where(sagas.c.id == saga_id)).one_or_none()
            if row is None:
                return None
            step_rows = conn.execute(
                select(steps).where(steps.c.saga_id == saga_id).order_by(steps.c.idx)
            ).all()
        return _saga_record(row, step_rows)

    def keyed(self, business_key: str) -> tuple[SagaRecord, ...]:
        """The sagas of every type whose business key is ``business_key``."""
        with self._read() as conn:
            ids = (
                conn.execute(
                    select(sagas.c.id).where(with_business_key(business_key)).order_by(sagas.c.name)
                )
                .scalars()
                .all()
            )
            rows = [_joined_record(conn.execute(WITH_STEPS, {"p_saga_id": i}).all()) for i in ids]
        return tuple(r for r in rows if r is not None)

    def find(self, ref: str) -> SagaRecord | None:
        record = self.load(ref)
        if record is not None:
            return record
        with self._read() as conn:
            saga_id = conn.execute(
                select(sagas.c.id)
                .where(with_business_key(ref))
                .order_by(sagas.c.created_at.desc())
                .limit(1)
            ).scalar_one_or_none()
        return self.load(saga_id) if saga_id else None

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

    def waiting_names(self) -> tuple[str, ...]:
        with self._read() as conn:
            return claim_rows.waiting_names(conn)

    def prunable(self, finished_before: datetime, name: str | None = None) -> int:
        with self._read() as conn:
            return retention.count_prunable(conn, finished_before, name)

    # -- messages and guards ------------------------------------------------------------

    def unsent(self, created_before: datetime, limit: int) -> tuple[OutboxMessage, ...]:
        taken = select(guards.c.key).where(guards.c.key == outbox.c.key).exists()
        with self._read() as conn:
            rows = conn.execute(
                select(outbox)
                .where(*where(outbox, row_filters.unsent(created_before)), ~taken)
                .order_by(outbox.c.id)
                .limit(limit)
            ).all()
        return tuple(
            OutboxMessage(r.saga_id, r.body, id=r.id, created_at=r.created_at) for r in rows
        )

    def get_guard(self, key: str) -> GuardRecord | None:
        with self._read() as conn:
            return guard_rows.get_guard(conn, key)

    # -- failed attempts and the dead-letter queue ------------------------------------

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
