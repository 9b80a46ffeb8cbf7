"""``SqlSagaStore``: the ``SagaStore`` seam on SQLAlchemy Core (PostgreSQL and SQLite).

Every write method is one transaction. Saga updates are a compare-and-set on ``version``
(works on SQLite, where ``FOR UPDATE`` is ignored).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, Table, bindparam, case, func, select, update
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError

from celery_sagas.errors import (
    PayloadConflictError,
    SagaError,
    StoreUnavailableError,
)
from celery_sagas.machine import Decision, SagaState
from celery_sagas.protocols import (
    AttemptRecord,
    Compacted,
    CreateResult,
    DeadLetterRecord,
    Expectation,
    GuardRecord,
    NewSaga,
    OutboxMessage,
    Pruned,
    SagaRecord,
    TransitionRecord,
    expects,
)
from celery_sagas.settings import redact_url
from celery_sagas.store import caller, once, one_statement, retention, writes
from celery_sagas.store import claims as claim_rows
from celery_sagas.store import dead_letters as dead_letter_rows
from celery_sagas.store import guards as guard_rows
from celery_sagas.store.backends import POSTGRES, backend_named
from celery_sagas.store.browse import with_business_key
from celery_sagas.store.claims import SqlClaim
from celery_sagas.store.engine import autocommit_engine, shared_engine
from celery_sagas.store.prepared import Prepared
from celery_sagas.store.records import STEP_COLUMNS, _fresh_record, _joined_record, _saga_record
from celery_sagas.store.tables import (
    attempts,
    dead_letters,
    guards,
    outbox,
    sagas,
    steps,
    transitions,
)

# the saga row and its steps in one round trip (built once: see ``one_statement``)
WITH_STEPS = (
    select(sagas, *STEP_COLUMNS)
    .join(steps, steps.c.saga_id == sagas.c.id)
    .where(sagas.c.id == bindparam("p_saga_id"))
    .order_by(steps.c.idx)
)


# PostgreSQL: mark a step started and read its saga, one round trip (``begin_step``); the
# payload comes in the first step's row only (decoded once, not once per step)
BEGIN_STEP = guard_rows.begin_step_statement(
    select(
        *(column for column in sagas.c if column.name != "payload"),
        case((steps.c.idx == 0, sagas.c.payload)).label("payload"),
        *STEP_COLUMNS,
    )
    .join(steps, steps.c.saga_id == sagas.c.id)
    .where(sagas.c.id == bindparam("p_saga_id"))
    .order_by(steps.c.idx)
)


class SqlSagaStore:
    """The saga store on PostgreSQL (``postgresql+psycopg2://``) or SQLite."""

    def __init__(
        self, url_or_engine: str | Engine, prepare: bool = True, **engine_options: Any
    ) -> None:
        """``prepare=False``: no server-side prepared statements on PostgreSQL (behind a
        pooler in transaction mode)."""
        if isinstance(url_or_engine, str):
            self.engine = shared_engine(url_or_engine, **engine_options)
        else:
            self.engine = url_or_engine
        self.backend = backend_named(self.engine.dialect.name)
        self.is_postgres = self.backend is POSTGRES
        self._autocommit: Engine | None = None
        if self.is_postgres and isinstance(url_or_engine, str):
            self._autocommit = autocommit_engine(url_or_engine, **engine_options)
        elif self.is_postgres:  # an engine of the caller's: its own pool, set per checkout
            self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self.prepare = prepare
        # PostgreSQL only (a data-modifying CTE); compiled once per store
        self._begin_step = (
            Prepared(BEGIN_STEP, self.engine.dialect, prepare) if self.is_postgres else None
        )
        self._begun = guard_rows.Begun(self._begin_step.labels) if self._begin_step else None
        self._mark_started = guard_rows.mark_started_statement(self._insert(guards))

    def __repr__(self) -> str:
        return f"SqlSagaStore({redact_url(str(self.engine.url))})"

    # -- helpers ------------------------------------------------------------------

    def _insert(self, table: Table) -> Any:
        """An INSERT with ``on_conflict_do_nothing`` for this backend."""
        return self.backend.insert(table)

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
    def _one_statement(self) -> Iterator[Connection]:
        """A write that is a single statement: autocommit on PostgreSQL (no BEGIN and
        COMMIT round trips), a transaction on SQLite (whose writers begin IMMEDIATE)."""
        if self._autocommit is None:
            with self._connect() as conn:
                yield conn
            return
        with self._unavailable_as_error(), self._autocommit.connect() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._unavailable_as_error(), self.engine.connect() as conn:
            yield conn

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

    def create_in(
        self,
        within: Any,
        new: NewSaga,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
    ) -> CreateResult:
        """``create`` inside the caller's transaction (a ``Connection`` or ``Session`` on
        this database), which commits or rolls it back with its own rows. READ COMMITTED:
        a concurrent start of the same key waits for the other transaction's outcome."""
        conn = caller.connection_of(within)
        try:
            with self._unavailable_as_error():
                return self._create_in(conn, new, decision, messages, now, prepare=False)
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
        opened = self._one_statement() if self.is_postgres else self._connect()
        with opened as conn:
            return self._create_in(conn, new, decision, messages, now, self.prepare)

    def _create_in(
        self,
        conn: Connection,
        new: NewSaga,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
        prepare: bool,
    ) -> CreateResult:
        if self.is_postgres:
            written = one_statement.create(conn, new, decision, messages, now, prepare)
            if written is not None:
                return CreateResult(_fresh_record(new, decision, now), True, written)
            return self._existing(conn, new)
        inserted = conn.execute(
            self._insert(sagas)
            .values(**writes.new_saga_values(new, decision, now))
            # any conflict: the business key, or the same start delivered twice (its
            # task id is the saga id)
            .on_conflict_do_nothing()
        )
        if inserted.rowcount == 0:
            return self._existing(conn, new)
        conn.execute(
            steps.insert(),
            [
                {"saga_id": new.saga_id, "idx": i, "name": name, "status": "pending"}
                for i, name in enumerate(new.step_names)
            ],
        )
        written = writes.write_decision(
            conn, self._insert, new.saga_id, decision, messages, now, fresh=True
        )
        return CreateResult(_fresh_record(new, decision, now), True, written)

    def after_commit(self, within: Any, callback: Callable[[], Any]) -> bool:
        """Run ``callback`` when the caller's ``Session`` commits; False if it cannot
        (a ``Connection``)."""
        return caller.after_commit(within, callback)

    def _existing(self, conn: Connection, new: NewSaga) -> CreateResult:
        """A start whose saga exists: the same payload returns it, another is refused."""
        existing = conn.execute(
            select(sagas.c.id, sagas.c.payload_hash).where(
                sagas.c.name == new.name, sagas.c.business_key == new.business_key
            )
        ).one_or_none()
        if existing is None:
            raise SagaError(
                f"saga id {new.saga_id} is already used by another saga; nothing was written",
                saga_id=new.saga_id,
            )
        if existing.payload_hash != new.payload_hash:
            raise PayloadConflictError(
                f"{new.name} {new.business_key!r} was already started with a "
                f"different payload (saga {existing.id}); nothing was written",
                saga_id=existing.id,
                business_key=new.business_key,
            )
        record = _joined_record(conn.execute(WITH_STEPS, {"p_saga_id": existing.id}).all())
        assert record is not None
        return CreateResult(record=record, created=False, messages=())

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

    def _commit_in(
        self,
        conn: Connection,
        saga: SagaRecord,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
    ) -> tuple[OutboxMessage, ...]:
        writes.update_saga(conn, saga, decision, now)
        return writes.write_decision(conn, self._insert, saga.saga_id, decision, messages, now)

    def commit(
        self,
        saga: SagaRecord,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
    ) -> tuple[OutboxMessage, ...]:
        with self._connect() as conn:
            return self._commit_in(conn, saga, decision, messages, now)

    def migrate(
        self,
        saga: SagaRecord,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
    ) -> tuple[OutboxMessage, ...]:
        """Replace the saga's definition and step rows by ``saga``'s and commit
        ``decision``, in one transaction gated on ``saga.version``."""
        with self._connect() as conn:
            writes.replace_steps(conn, saga)
            return self._commit_in(conn, saga, decision, messages, now)

    def write(
        self,
        saga: SagaRecord,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
        guard: GuardRecord | None = None,
    ) -> tuple[OutboxMessage, ...]:
        """On PostgreSQL: ONE statement gated on the compare-and-set of the version read
        (``one_statement``), in autocommit; on SQLite (and for a dead-letter change): one
        transaction."""
        if self.is_postgres and one_statement.fits(decision):
            with self._one_statement() as conn:
                return one_statement.write(conn, saga, decision, messages, now, guard, self.prepare)
        with self._connect() as conn:
            self._record_guard(conn, guard, now)
            return self._commit_in(conn, saga, decision, messages, now)

    def _record_guard(self, conn: Connection, guard: GuardRecord | None, now: datetime) -> None:
        """A step outcome written in the caller's transaction (nothing if ``guard`` is None)."""
        if guard is not None:
            guard_rows.record_guard(conn, self._insert(guards), guard, now)

    # -- scanning ---------------------------------------------------------------------

    @contextmanager
    def claim_due(self, now: datetime, limit: int) -> Iterator[SqlClaim]:
        with self._connect() as conn:
            yield SqlClaim(self, conn, claim_rows.claim_due(conn, now, limit, self.backend))

    @contextmanager
    def claim_waiting(self, name: str, max_concurrent: int) -> Iterator[SqlClaim]:
        with self._connect() as conn:
            records = claim_rows.claim_waiting(conn, name, max_concurrent, self.backend)
            yield SqlClaim(self, conn, records)

    def waiting_names(self) -> tuple[str, ...]:
        with self._read() as conn:
            return claim_rows.waiting_names(conn)

    def report_stuck(
        self, older_than: datetime, now: datetime, limit: int
    ) -> tuple[SagaRecord, ...]:
        with self._connect() as conn:
            return claim_rows.report_stuck(conn, older_than, now, limit, self.backend)

    def mark_sent(self, message_ids: Sequence[int], now: datetime) -> None:
        if not message_ids:
            return
        with self._connect() as conn:
            # Losing this mark only means a harmless duplicate publish by the relay.
            self.backend.relax_commit(conn)
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
            return guard_rows.get_guard(conn, key)

    def begin_step(
        self, key: str, saga_id: str, now: datetime, expectation: Expectation
    ) -> tuple[GuardRecord | None, SagaRecord | None]:
        if self._begin_step is None:  # SQLite: load, then mark if expected
            record = self.load(saga_id)
            if not expects(record, expectation):
                return None, record
            return self.begin_guard(key, now), record
        with self._one_statement() as conn:
            params = {
                "g_key": key,
                "g_now": now,
                "p_saga_id": saga_id,
                "g_step": expectation.step,
                "g_token": expectation.token,
                "g_role": expectation.role,
                "g_definition": expectation.definition,
            }
            rows = self._begin_step.raw(conn, params)
        if not rows:  # no such saga: nothing written
            return None, None
        assert self._begun is not None
        return self._begun.answer(rows)

    def begin_guard(self, key: str, now: datetime) -> GuardRecord | None:
        with self._one_statement() as conn:
            return guard_rows.begin_guard(conn, self._mark_started, key, now)

    def claim_once(self, key: str, now: datetime, lease: float) -> once.Claimed:
        """Claim ``key`` to run something once (an outcome hook): ``run``, ``busy`` (held by
        another delivery, for up to ``lease`` seconds) or ``done``."""
        with self._connect() as conn:
            return once.claim(conn, key, now, lease)

    def release_claim(self, key: str) -> None:
        with self._connect() as conn:
            once.release(conn, key)

    def finish_claim(self, key: str, saga_id: str, now: datetime) -> None:
        with self._connect() as conn:
            once.finish(conn, key, saga_id, now)

    def put_guard(self, guard: GuardRecord, now: datetime) -> GuardRecord:
        with self._connect() as conn:
            return guard_rows.put_guard(conn, self._insert(guards), guard, now)

    # -- retention ----------------------------------------------------------------------

    def prunable(self, finished_before: datetime, name: str | None = None) -> int:
        with self._read() as conn:
            return retention.count_prunable(conn, finished_before, name)

    def prune(
        self,
        finished_before: datetime,
        limit: int,
        name: str | None = None,
        after: tuple[datetime, str] | None = None,
    ) -> Pruned:
        with self._connect() as conn:
            return retention.prune(conn, finished_before, limit, name, after, self.backend)

    def compact(self, finished_before: datetime, limit: int, now: datetime) -> Compacted:
        with self._connect() as conn:
            return retention.compact(conn, finished_before, now, limit, self.backend)

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
