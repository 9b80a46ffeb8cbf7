"""``InMemorySagaStore``: the ``SagaStore`` contract of ``SqlSagaStore`` in memory.

The same contract suite (``tests/integration/test_store_contract.py``) runs against both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING

from celery_sagas import row_filters
from celery_sagas.definition import idempotency_key
from celery_sagas.errors import SagaError
from celery_sagas.machine import Decision, Role, SagaState
from celery_sagas.protocols import (
    STARTED,
    AttemptRecord,
    CreateResult,
    DeadLetterRecord,
    Expectation,
    GuardRecord,
    NewSaga,
    OutboxMessage,
    SagaRecord,
    SagaStore,
    TransitionRecord,
    expects,
)
from celery_sagas.row_changes import (
    auto_retry_claimable,
    auto_retry_columns,
    changed_since,
    consumes_unsent,
    forgets_started_marker,
    new_saga_record,
    outbox_columns,
    recorded_guard,
    refused_start,
    replaceable,
    saga_columns,
    saga_fields,
    started_marker,
    step_columns,
    step_fields,
    still_at,
    transition_rows,
    written_messages,
)
from celery_sagas.row_filters import holds
from celery_sagas.testing import dead_letters
from celery_sagas.testing.columns import as_json, as_utc
from celery_sagas.testing.pruning import MemoryRetention
from celery_sagas.testing.scans import MemoryScans
from celery_sagas.testing.tables import detached


def _decided(saga: SagaRecord, decision: Decision, now: datetime) -> SagaRecord:
    """``saga`` with the saga columns and step columns ``decision`` sets (``row_changes``)."""
    steps = list(saga.steps)
    for index, values in step_columns(decision.step_changes, now).items():
        fields = step_fields(values)
        if "result" in fields:
            fields["result"] = as_json(fields["result"])
        steps[index] = replace(steps[index], **fields)
    return replace(saga, **saga_fields(saga_columns(saga, decision, now)), steps=tuple(steps))


class InMemorySagaStore(MemoryRetention, MemoryScans):
    """The ``SagaStore`` contract in memory, thread-safe behind one (re-entrant) lock.

    ``calls`` lists the name of every store method called, in order, so a test can assert
    e.g. ``store.calls.count("write")`` (``write`` is one call, not ``"write"`` and
    ``"commit"``; a claim's commits are ``"claim.commit"``).
    ``row_counts()`` gives the rows per table, named like the SQL tables.
    """

    def __repr__(self) -> str:
        return f"InMemorySagaStore({len(self._sagas)} sagas)"

    # -- writes (under the lock; nothing changes until everything is built) ------------

    def _write_rows(
        self,
        saga: SagaRecord,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
        fresh: bool = False,
    ) -> tuple[OutboxMessage, ...]:
        """The rows of ``decision`` other than the saga's own (``row_changes``): the
        transition log, the dead-letter change, the consumed and the new outbox rows."""
        rows = [outbox_columns(saga.saga_id, m, now) for m in messages]
        bodies = [as_json(row["body"]) for row in rows]
        entry = None
        if decision.dead_letter is not None:
            entry = dead_letters.changed(self._dead_letters, saga, decision.dead_letter, now)
        # everything is built: from here on, nothing can fail half-way
        self._transitions.extend(transition_rows(saga.saga_id, decision, now))
        if entry is not None:
            self._dead_letters[entry.id] = entry
            if forgets_started_marker(entry.status):
                key = idempotency_key(saga.saga_id, entry.step_name, Role.COMPENSATION)
                if key in self._guards and self._guards[key].outcome == STARTED:
                    del self._guards[key]
        if consumes_unsent(fresh):
            for message_id, message in self._outbox.items():
                if message.saga_id == saga.saga_id and message.sent_at is None:
                    self._outbox[message_id] = replace(message, sent_at=now)
        ids = []
        for row, body in zip(rows, bodies, strict=True):
            ids.append(next(self._outbox_ids))
            self._outbox[ids[-1]] = OutboxMessage(saga.saga_id, body, id=ids[-1], created_at=now)
            self._outbox_keys[ids[-1]] = row["key"]
        return written_messages(saga.saga_id, messages, ids, now)

    def _commit(
        self,
        call: str | None,
        saga: SagaRecord,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
    ) -> tuple[OutboxMessage, ...]:
        assert decision.accepted and decision.state is not None
        now = as_utc(now)
        with self._lock:
            if call is not None:
                self.calls.append(call)
            current = self._sagas.get(saga.saga_id)
            if current is None or not still_at(current, saga):
                raise changed_since(saga)
            updated = _decided(current, decision, now)
            written = self._write_rows(updated, decision, messages, now)
            self._sagas[saga.saga_id] = updated
            return written

    # -- SagaStore ---------------------------------------------------------------------

    def create(
        self,
        new: NewSaga,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
    ) -> CreateResult:
        assert decision.state is not None
        now = as_utc(now)
        with self._lock:
            self.calls.append("create")
            existing_id = self._keys.get((new.name, new.business_key))
            if existing_id is not None or new.saga_id in self._sagas:
                existing_hash = None if existing_id is None else self._hashes[existing_id]
                refused = refused_start(new, existing_id, existing_hash)
                if refused is not None:
                    raise refused
                assert existing_id is not None
                return CreateResult(detached(self._sagas[existing_id]), created=False)
            saga = detached(new_saga_record(new, decision, now))
            if new.deadline_at is not None:
                saga = replace(saga, deadline_at=as_utc(new.deadline_at))
            written = self._write_rows(saga, decision, messages, now, fresh=True)
            self._sagas[saga.saga_id] = saga
            self._hashes[saga.saga_id] = new.payload_hash
            self._keys[(new.name, new.business_key)] = saga.saga_id
            return CreateResult(detached(saga), created=True, messages=written)

    def commit(
        self,
        saga: SagaRecord,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
    ) -> tuple[OutboxMessage, ...]:
        return self._commit("commit", saga, decision, messages, now)

    def migrate(
        self,
        saga: SagaRecord,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
    ) -> tuple[OutboxMessage, ...]:
        """As the SQL store: the saga's definition and step rows replaced by ``saga``'s,
        then ``decision`` committed, all under one compare-and-set."""
        with self._lock:
            self.calls.append("migrate")
            current = self._sagas.get(saga.saga_id)
            if current is None or not still_at(current, saga):
                raise changed_since(saga)
            self._sagas[saga.saga_id] = replace(
                current, definition=saga.definition, steps=detached(saga).steps
            )
            return self._commit(None, saga, decision, messages, now)

    def write(
        self,
        saga: SagaRecord,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
        guard: GuardRecord | None = None,
    ) -> tuple[OutboxMessage, ...]:
        """One call, one transaction (recorded as ``"write"`` only, no ``"commit"``)."""
        with self._lock:
            self.calls.append("write")
            if guard is not None and still_at(self._sagas.get(saga.saga_id), saga):
                self._put_guard(guard, as_utc(now))
            return self._commit(None, saga, decision, messages, now)

    def mark_sent(self, message_ids: Sequence[int], now: datetime) -> None:
        now = as_utc(now)
        with self._lock:
            self.calls.append("mark_sent")
            for message_id in message_ids:
                message = self._outbox.get(message_id)
                if message is not None and message.sent_at is None:
                    self._outbox[message_id] = replace(message, sent_at=now)

    def begin_step(
        self,
        key: str,
        saga_id: str,
        now: datetime,
        expectation: Expectation,
        delivery: str | None = None,
    ) -> tuple[GuardRecord | None, SagaRecord | None]:
        """One call, as the SQL store's one round trip (recorded as ``"begin_step"``):
        the marker is written only if the saga expects the message."""
        with self._lock:
            self.calls.append("begin_step")
            saga = self._sagas.get(saga_id)
            snapshot = detached(saga) if saga else None
            if not expects(snapshot, expectation):
                return None, snapshot
            return self._begin_guard(key, as_utc(now), delivery), snapshot

    def begin_guard(
        self, key: str, now: datetime, delivery: str | None = None
    ) -> GuardRecord | None:
        with self._lock:
            self.calls.append("begin_guard")
            return self._begin_guard(key, as_utc(now), delivery)

    def _begin_guard(self, key: str, now: datetime, delivery: str | None) -> GuardRecord | None:
        guard = self._guards.get(key)
        if replaceable(guard):  # a new or refreshed start
            self._guards[key] = started_marker(key, now, delivery)
            return None
        assert guard is not None
        return replace(guard, result=as_json(guard.result))

    def put_guard(self, guard: GuardRecord, now: datetime) -> GuardRecord:
        with self._lock:
            self.calls.append("put_guard")
            return self._put_guard(guard, as_utc(now))

    def hand_over_started(self, key: str, delivery: str, to: str | None = None) -> bool:
        with self._lock:
            self.calls.append("hand_over_started")
            guard = self._guards.get(key)
            if guard is None or guard.outcome != STARTED or guard.result != delivery:
                return False
            if to is None:
                del self._guards[key]
            else:
                self._guards[key] = replace(guard, result=to)
            return True

    def beat_started(self, markers: Mapping[str, str | None], at: datetime) -> int:
        with self._lock:
            self.calls.append("beat_started")
            refreshed = 0
            for key, delivery in markers.items():
                guard = self._guards.get(key)
                if guard is None or guard.outcome != STARTED:
                    continue
                if delivery is None or guard.result == delivery:
                    self._guards[key] = replace(guard, recorded_at=at)
                    refreshed += 1
            return refreshed

    def _put_guard(self, guard: GuardRecord, now: datetime) -> GuardRecord:
        if replaceable(self._guards.get(guard.key)):
            recorded = recorded_guard(guard, now)
            self._guards[guard.key] = replace(recorded, result=as_json(recorded.result))
        recorded = self._guards[guard.key]
        return replace(recorded, result=as_json(recorded.result))

    # -- reads -------------------------------------------------------------------------

    def load(self, saga_id: str) -> SagaRecord | None:
        with self._lock:
            self.calls.append("load")
            saga = self._sagas.get(saga_id)
            return detached(saga) if saga else None

    def find(self, ref: str) -> SagaRecord | None:
        with self._lock:
            self.calls.append("find")
            saga = self._sagas.get(ref)
            if saga is None:
                same_key = [s for s in self._sagas.values() if s.business_key == ref]
                saga = max(same_key, key=lambda s: s.created_at, default=None)
            return detached(saga) if saga else None

    def unsent(self, created_before: datetime, limit: int) -> tuple[OutboxMessage, ...]:
        created_before = as_utc(created_before)
        with self._lock:
            self.calls.append("unsent")
            unsent = row_filters.unsent(created_before)
            pending = [
                replace(m, body=as_json(m.body))
                for i, m in sorted(self._outbox.items())
                if holds(unsent, vars(m))
                and self._outbox_keys.get(i) not in self._guards  # no worker took it yet
            ]
            return tuple(pending[:limit])

    def get_guard(self, key: str) -> GuardRecord | None:
        with self._lock:
            self.calls.append("get_guard")
            guard = self._guards.get(key)
            return replace(guard, result=as_json(guard.result)) if guard else None

    def list_sagas(
        self,
        state: SagaState | None = None,
        name: str | None = None,
        limit: int = 100,
        created_before: datetime | None = None,
        unfinished: bool = False,
    ) -> tuple[SagaRecord, ...]:
        with self._lock:
            self.calls.append("list_sagas")
            found = [
                detached(s, with_steps=False)  # like the SQL store: no steps in listings
                for s in self._sagas.values()
                if (state is None or s.state == state)
                and (name is None or s.name == name)
                and (created_before is None or s.created_at < created_before)
                and not (unfinished and s.finished_at is not None)
            ]
        return tuple(_newest_first(found)[:limit])

    def count_by_state(self) -> Mapping[str, int]:
        with self._lock:
            self.calls.append("count_by_state")
            counts: dict[str, int] = {}
            for saga in self._sagas.values():
                counts[saga.state.value] = counts.get(saga.state.value, 0) + 1
            return counts

    def transitions(self, saga_id: str) -> tuple[TransitionRecord, ...]:
        with self._lock:
            self.calls.append("transitions")
            return tuple(t for t in self._transitions if t.saga_id == saga_id)

    # -- failed attempts and the dead-letter queue ---------------------------------------

    def record_attempt(
        self, saga_id: str, key: str, attempt: int, error: str, now: datetime
    ) -> None:
        now = as_utc(now)
        with self._lock:
            self.calls.append("record_attempt")
            if saga_id not in self._sagas:  # a foreign key in SQL
                raise SagaError(
                    f"cannot record an attempt of unknown saga {saga_id}; nothing was written",
                    saga_id=saga_id,
                )
            self._attempts.append(AttemptRecord(saga_id, key, attempt, now, error))

    def attempts(self, key: str) -> tuple[AttemptRecord, ...]:
        with self._lock:
            self.calls.append("attempts")
            mine = [a for a in self._attempts if a.key == key]
        return tuple(sorted(mine, key=lambda a: a.attempt))  # stable: then insertion order

    def dead_letters(
        self, saga_id: str | None = None, status: str | None = None, limit: int = 100
    ) -> tuple[DeadLetterRecord, ...]:
        with self._lock:
            self.calls.append("dead_letters")
            found = [
                dead_letters.detached(entry)
                for _, entry in sorted(self._dead_letters.items())
                if dead_letters.matches(entry, saga_id, status)
            ]
        return tuple(found[: max(0, limit)])

    def dead_letter(self, entry_id: int) -> DeadLetterRecord | None:
        with self._lock:
            self.calls.append("dead_letter")
            entry = self._dead_letters.get(entry_id)
            return dead_letters.detached(entry) if entry else None

    def dead_letter_for(self, saga_id: str, step: int) -> DeadLetterRecord | None:
        with self._lock:
            self.calls.append("dead_letter_for")
            entry = dead_letters.entry_for(self._dead_letters, saga_id, step)
            return dead_letters.detached(entry) if entry else None

    def claim_auto_retry(self, entry: DeadLetterRecord, next_at: datetime) -> bool:
        next_at = as_utc(next_at)
        with self._lock:
            self.calls.append("claim_auto_retry")
            current = self._dead_letters.get(entry.id)
            if current is None or not auto_retry_claimable(current, entry):
                return False
            self._dead_letters[entry.id] = replace(current, **auto_retry_columns(entry, next_at))
            return True


def _newest_first(sagas: list[SagaRecord]) -> list[SagaRecord]:
    """``ORDER BY created_at DESC, id``."""
    by_id = sorted(sagas, key=lambda s: s.saga_id)
    return sorted(by_id, key=lambda s: s.created_at, reverse=True)


if TYPE_CHECKING:  # mypy proves the fake keeps the whole protocol
    _conforms: SagaStore = InMemorySagaStore()
