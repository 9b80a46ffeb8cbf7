"""The scanner's claims in ``InMemorySagaStore``: due sagas, sagas waiting for a free slot
and sagas stuck for too long, as ``celery_sagas.store.claims`` takes them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime

from celery_sagas import row_filters
from celery_sagas.machine import Decision
from celery_sagas.protocols import STARTED, OutboxMessage, SagaRecord, current_execution_key
from celery_sagas.row_changes import with_current_start
from celery_sagas.testing.columns import as_utc
from celery_sagas.testing.tables import MemoryTables, detached, oldest_first


class MemoryClaim:
    """Sagas claimed by a scan; the store stays locked, and any error undoes the claim's
    commits, as the rollback of the SQL claim's transaction would."""

    def __init__(self, store: MemoryTables, records: tuple[SagaRecord, ...]) -> None:
        self._store = store
        self.records = records

    def commit(
        self,
        saga: SagaRecord,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
    ) -> tuple[OutboxMessage, ...]:
        return self._store._commit("claim.commit", saga, decision, messages, now)


class MemoryScans(MemoryTables):
    """What the scanner needs: claims (``MemoryClaim``) and the stuck-saga report."""

    def _claimed(self, sagas: Sequence[SagaRecord]) -> MemoryClaim:
        """Copies with the current step's ``started`` flag (``row_changes``)."""
        records = []
        for saga in sagas:
            guard = self._guards.get(current_execution_key(saga))
            began_at = guard.recorded_at if guard and guard.outcome == STARTED else None
            records.append(with_current_start(detached(saga), began_at))
        return MemoryClaim(self, tuple(records))

    @contextmanager
    def claim_due(self, now: datetime, limit: int) -> Iterator[MemoryClaim]:
        now = as_utc(now)
        with self._transaction("claim_due"):
            due = sorted(self._sagas_where(row_filters.due(now)), key=lambda s: s.due_at or now)
            yield self._claimed(due[:limit])

    @contextmanager
    def claim_waiting(self, name: str, max_concurrent: int) -> Iterator[MemoryClaim]:
        with self._transaction("claim_waiting"):
            running = len(self._sagas_where(row_filters.running(name)))
            waiting = sorted(self._sagas_where(row_filters.waiting(name)), key=oldest_first)
            yield self._claimed(waiting[: max(0, max_concurrent - running)])

    def waiting_names(self) -> tuple[str, ...]:
        with self._lock:
            self.calls.append("waiting_names")
            return tuple(sorted({s.name for s in self._sagas_where(row_filters.waiting())}))

    def report_stuck(
        self, older_than: datetime, now: datetime, limit: int
    ) -> tuple[SagaRecord, ...]:
        older_than, now = as_utc(older_than), as_utc(now)
        with self._transaction("report_stuck"):
            stuck = sorted(self._sagas_where(row_filters.stuck(older_than)), key=oldest_first)
            stuck = stuck[:limit]
            for saga in stuck:
                self._stuck_reported[saga.saga_id] = now
            return tuple(detached(s, with_steps=False) for s in stuck)
