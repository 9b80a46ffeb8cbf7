"""``SqlSagaStore``: the ``SagaStore`` seam on SQLAlchemy Core, the part that is the same
on PostgreSQL and SQLite. ``SqlSagaStore(url_or_engine)`` returns the store of that
database: ``PostgresSagaStore`` (``postgres_store``) or ``SqliteSagaStore``
(``sqlite_store``), each of which holds only its own way of writing a transition.

Every write method is one transaction. Saga updates are a compare-and-set on ``version``
(works on SQLite, where there are no row locks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import Connection, Engine, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from celery_sagas.errors import DatabaseUrlError, SagaError
from celery_sagas.machine import Decision
from celery_sagas.protocols import (
    Compacted,
    CreateResult,
    DeadLetterRecord,
    Expectation,
    GuardRecord,
    NewSaga,
    OutboxMessage,
    Pruned,
    SagaRecord,
)
from celery_sagas.row_changes import refused_start
from celery_sagas.store import caller, drivers, once, retention, writes
from celery_sagas.store import claims as claim_rows
from celery_sagas.store import dead_letters as dead_letter_rows
from celery_sagas.store import guards as guard_rows
from celery_sagas.store.backends import Backend, backend_named
from celery_sagas.store.browse import check_database_url
from celery_sagas.store.claims import SqlClaim
from celery_sagas.store.engine import shared_engine
from celery_sagas.store.reads import WITH_STEPS, SqlReads
from celery_sagas.store.records import _joined_record
from celery_sagas.store.tables import attempts, guards, outbox, sagas


def _dialect_of(url_or_engine: str | Engine) -> str:
    if isinstance(url_or_engine, str):
        check_database_url(url_or_engine)
        return make_url(url_or_engine).get_backend_name()
    return url_or_engine.dialect.name


class SqlSagaStore(SqlReads):
    """The saga store on PostgreSQL (``postgresql+psycopg2://``, or ``postgresql+psycopg://``
    for psycopg 3) or SQLite: calling it
    makes the subclass of the URL's (or engine's) database."""

    backend: ClassVar[Backend]
    _by_dialect: ClassVar[dict[str, type[SqlSagaStore]]] = {}

    def __init_subclass__(cls, backend: Backend | None = None, **kwargs: Any) -> None:
        """``class PostgresSagaStore(SqlSagaStore, backend=POSTGRES)``: the store the
        constructor makes for that backend's database (a subclass of it inherits it)."""
        super().__init_subclass__(**kwargs)
        if backend is not None:
            cls.backend = backend
            SqlSagaStore._by_dialect[backend.name] = cls

    def __new__(
        cls, url_or_engine: str | Engine, prepare: bool = True, **engine_options: Any
    ) -> SqlSagaStore:
        dialect = backend_named(_dialect_of(url_or_engine)).name
        if cls is SqlSagaStore:
            return super().__new__(SqlSagaStore._by_dialect[dialect])
        if cls.backend.name != dialect:
            raise DatabaseUrlError(f"{cls.__name__} cannot store sagas in {dialect}")
        return super().__new__(cls)

    def __init__(
        self, url_or_engine: str | Engine, prepare: bool = True, **engine_options: Any
    ) -> None:
        """``prepare=False``: no server-side prepared statements on PostgreSQL (behind a
        pooler in transaction mode; with psycopg 3 the store's engines get
        ``prepare_threshold=None``, which an engine of the caller's must have already)."""
        if isinstance(url_or_engine, str):
            engine_options = drivers.engine_options(url_or_engine, prepare, engine_options)
            self.engine = shared_engine(url_or_engine, **engine_options)
        else:
            self.engine = url_or_engine
        self.prepare = prepare
        self._mark_started = guard_rows.mark_started_statement(self.backend.insert(guards))

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        """One write transaction."""
        with self._unavailable_as_error(), self.engine.begin() as conn:
            yield conn

    # -- each backend's own way (``postgres_store``, ``sqlite_store``) ----------------------

    def _create(
        self, new: NewSaga, decision: Decision, messages: Sequence[OutboxMessage], now: datetime
    ) -> CreateResult:
        """``create`` in a transaction (or statement) of the store's own."""
        raise NotImplementedError

    def _create_in(
        self,
        conn: Connection,
        new: NewSaga,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
        prepare: bool,
    ) -> CreateResult:
        """``create`` on ``conn``, in whatever transaction it is in."""
        raise NotImplementedError

    def begin_step(
        self,
        key: str,
        saga_id: str,
        now: datetime,
        expectation: Expectation,
        delivery: str | None = None,
    ) -> tuple[GuardRecord | None, SagaRecord | None]:
        """The saga, and ``key`` marked started by ``delivery`` if the saga expects the
        step (else the outcome an earlier delivery recorded, if any)."""
        raise NotImplementedError

    def begin_guard(
        self, key: str, now: datetime, delivery: str | None = None
    ) -> GuardRecord | None:
        """Mark ``key`` started; the recorded final outcome of an earlier delivery, if any."""
        raise NotImplementedError

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
        existing_id, existing_hash = (None, None) if existing is None else existing
        refused = refused_start(new, existing_id, existing_hash)
        if refused is not None:
            raise refused
        record = _joined_record(conn.execute(WITH_STEPS, {"p_saga_id": existing_id}).all())
        assert record is not None
        return CreateResult(record=record, created=False, messages=())

    def _commit_in(
        self,
        conn: Connection,
        saga: SagaRecord,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
    ) -> tuple[OutboxMessage, ...]:
        writes.update_saga(conn, saga, decision, now)
        return writes.write_decision(
            conn, self.backend.insert, saga.saga_id, decision, messages, now
        )

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
        """The step's outcome (``guard``) and ``decision`` in one transaction."""
        with self._connect() as conn:
            if guard is not None:
                guard_rows.record_guard(conn, self.backend.insert(guards), guard, now)
            return self._commit_in(conn, saga, decision, messages, now)

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

    # -- guards and run-once claims -----------------------------------------------------

    def claim_once(self, key: str, now: datetime, lease: float) -> once.Claimed:
        """Claim ``key`` to run something once (an outcome hook): ``run``, ``busy`` (held by
        another delivery, for up to ``lease`` seconds) or ``done``."""
        with self._connect() as conn:
            return once.claim(conn, self.backend, key, now, lease)

    def release_claim(self, key: str) -> None:
        with self._connect() as conn:
            once.release(conn, key)

    def finish_claim(self, key: str, saga_id: str, now: datetime) -> None:
        with self._connect() as conn:
            once.finish(conn, key, saga_id, now)

    def put_guard(self, guard: GuardRecord, now: datetime) -> GuardRecord:
        with self._connect() as conn:
            return guard_rows.put_guard(conn, self.backend.insert(guards), guard, now)

    def hand_over_started(self, key: str, delivery: str, to: str | None = None) -> bool:
        with self._connect() as conn:
            return guard_rows.hand_over_started(conn, key, delivery, to)

    def beat_started(self, markers: Mapping[str, str | None], at: datetime) -> int:
        if not markers:
            return 0
        with self._connect() as conn:
            return guard_rows.beat_started(conn, markers, at)

    # -- retention ----------------------------------------------------------------------

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

    def claim_auto_retry(self, entry: DeadLetterRecord, next_at: datetime) -> bool:
        with self._connect() as conn:
            return dead_letter_rows.claim_auto_retry(conn, entry, next_at)
