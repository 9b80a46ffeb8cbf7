"""Test doubles shipped with the library: run sagas in one process, without Celery or a database.

``InMemorySagaStore`` keeps the ``SagaStore`` contract of ``SqlSagaStore`` (the same contract
suite runs against both) and records the calls it got in ``calls``. ``RecordingDispatcher``
keeps what was published in ``sent``. ``run_until_settled`` delivers those messages to the
participants and feeds their outcomes back to the coordinator until the saga settles::

    store, dispatcher = InMemorySagaStore(), RecordingDispatcher()
    coordinator = Coordinator(store, registry([order_saga]))
    started = coordinator.start("order", {"id": "A-1"})
    final = run_until_settled(coordinator, store, dispatcher, started.saga_id)
    assert final.state == SagaState.COMPLETED
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from celery_sagas import outbox
from celery_sagas.coordinator import Coordinator
from celery_sagas.definition import Step, StepContext, StepFunction
from celery_sagas.errors import (
    ConcurrentUpdateError,
    PayloadConflictError,
    SagaError,
    SagaNotFoundError,
)
from celery_sagas.machine import (
    LIVE_STATES,
    SETTLED_STATES,
    TERMINAL_STATES,
    CompensationFailed,
    CompensationSucceeded,
    Decision,
    Event,
    SagaState,
    StepChange,
    StepFailed,
    StepStatus,
    StepSucceeded,
)
from celery_sagas.policy import RetryAt, decide_retry
from celery_sagas.protocols import (
    STARTED,
    CreateResult,
    GuardRecord,
    NewSaga,
    OutboxMessage,
    SagaRecord,
    SagaStore,
    StepRecord,
    TransitionRecord,
    current_execution_key,
)

__all__ = ["InMemorySagaStore", "RecordingDispatcher", "run_until_settled"]

FINISHED_FORWARD = (StepStatus.COMPLETED, StepStatus.FAILED, StepStatus.TIMED_OUT)
FINISHED_COMPENSATION = (StepStatus.COMPENSATED, StepStatus.COMPENSATION_FAILED)
ACTIVE = (StepStatus.RUNNING, StepStatus.COMPENSATING)


def _json(value: Any) -> Any:
    """A JSON round trip: what a JSON column hands back (and a TypeError for what it refuses)."""
    return json.loads(json.dumps(value))


def _utc(when: datetime) -> datetime:
    if when.tzinfo is None:
        raise ValueError(f"naive datetime {when!r}: use timezone-aware datetimes")
    return when.astimezone(UTC)


def _apply(step: StepRecord, change: StepChange, now: datetime) -> StepRecord:
    """One step status change; timestamps follow the status (as ``repository.step_values``)."""
    values: dict[str, Any] = {"status": change.new}
    if change.has_result:
        values["result"] = _json(change.result)
    if change.error is not None:
        values["error"] = change.error
    if change.error_kind is not None:
        values["error_kind"] = change.error_kind
    for timing in ("deadline_at", "redispatch_at", "dispatches"):
        if getattr(change, timing) is not None:
            values[timing] = getattr(change, timing)
    if change.new not in ACTIVE:
        values.update(deadline_at=None, redispatch_at=None)
    if change.new == StepStatus.RUNNING and change.old != StepStatus.RUNNING:
        values.update(started_at=now, finished_at=None)
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
    return replace(step, **values)


def _copy(record: SagaRecord, with_steps: bool = True) -> SagaRecord:
    """A detached copy, as a fresh load from a database would be."""
    steps = tuple(replace(s, result=_json(s.result)) for s in record.steps) if with_steps else ()
    return replace(record, payload=_json(record.payload), steps=steps)


class MemoryClaim:
    """Sagas claimed by a scan; the store stays locked, and any error undoes the claim's
    commits, as the rollback of the SQL claim's transaction would."""

    def __init__(self, store: InMemorySagaStore, records: tuple[SagaRecord, ...]) -> None:
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


class InMemorySagaStore:
    """The ``SagaStore`` contract in memory, thread-safe behind one (re-entrant) lock.

    ``calls`` lists the name of every store method called, in order, so a test can assert
    e.g. ``store.calls.count("commit")`` (a claim's commits are ``"claim.commit"``).
    ``row_counts()`` gives the rows per table, named like the SQL tables.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._lock = threading.RLock()
        self._sagas: dict[str, SagaRecord] = {}
        self._hashes: dict[str, str] = {}
        self._keys: dict[tuple[str, str], str] = {}
        self._stuck_reported: dict[str, datetime] = {}
        self._transitions: list[TransitionRecord] = []
        self._outbox: dict[int, OutboxMessage] = {}
        self._guards: dict[str, GuardRecord] = {}

    def __repr__(self) -> str:
        return f"InMemorySagaStore({len(self._sagas)} sagas)"

    def row_counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "saga": len(self._sagas),
                "saga_step": sum(len(s.steps) for s in self._sagas.values()),
                "saga_transition": len(self._transitions),
                "saga_outbox": len(self._outbox),
                "saga_guard": len(self._guards),
            }

    @contextmanager
    def _transaction(self, call: str) -> Iterator[None]:
        """Hold the lock; on an error, put every table back as it was."""
        with self._lock:
            self.calls.append(call)
            tables = ("_sagas", "_hashes", "_keys", "_stuck_reported", "_outbox", "_guards")
            saved = {name: dict(getattr(self, name)) for name in tables}
            transitions = len(self._transitions)
            try:
                yield
            except BaseException:
                for name, table in saved.items():
                    setattr(self, name, table)
                del self._transitions[transitions:]
                raise

    # -- writes (under the lock; nothing changes until everything is built) ------------

    def _apply_decision(
        self,
        saga: SagaRecord,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
    ) -> tuple[SagaRecord, tuple[OutboxMessage, ...]]:
        steps = list(saga.steps)
        for change in decision.step_changes:
            steps[change.index] = _apply(steps[change.index], change, now)
        bodies = [_json(dict(m.body)) for m in messages]
        self._transitions.extend(
            TransitionRecord(saga.saga_id, now, t.step, t.old, t.new, t.reason)
            for t in decision.transitions
        )
        written = []
        for message, body in zip(messages, bodies, strict=True):
            new_id = len(self._outbox) + 1
            self._outbox[new_id] = OutboxMessage(saga.saga_id, body, id=new_id, created_at=now)
            written.append(OutboxMessage(saga.saga_id, message.body, id=new_id, created_at=now))
        return replace(saga, steps=tuple(steps)), tuple(written)

    def _commit(
        self,
        call: str,
        saga: SagaRecord,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
    ) -> tuple[OutboxMessage, ...]:
        assert decision.accepted and decision.state is not None
        now = _utc(now)
        with self._lock:
            self.calls.append(call)
            current = self._sagas.get(saga.saga_id)
            if current is None or current.version != saga.version:
                raise ConcurrentUpdateError(
                    f"saga {saga.saga_id} changed since version {saga.version}",
                    saga_id=saga.saga_id,
                )
            updated = replace(
                current,
                state=decision.state,
                current_step=decision.current_step,
                token=decision.token,
                version=current.version + 1,
                updated_at=now,
                due_at=decision.due_at,
                reason=current.reason if decision.reason is None else decision.reason,
                finished_at=now if decision.state in TERMINAL_STATES else current.finished_at,
                admitted=current.admitted or decision.admitted,
            )
            updated, written = self._apply_decision(updated, decision, messages, now)
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
        now = _utc(now)
        with self._lock:
            self.calls.append("create")
            existing_id = self._keys.get((new.name, new.business_key))
            if existing_id is not None:
                if self._hashes[existing_id] != new.payload_hash:
                    raise PayloadConflictError(
                        f"{new.name} {new.business_key!r} was already started with a "
                        f"different payload (saga {existing_id}); nothing was written",
                        saga_id=existing_id,
                        business_key=new.business_key,
                    )
                return CreateResult(_copy(self._sagas[existing_id]), created=False)
            if new.saga_id in self._sagas:
                raise SagaError(f"saga id {new.saga_id} is already taken; nothing was written")
            saga = SagaRecord(
                saga_id=new.saga_id,
                name=new.name,
                business_key=new.business_key,
                state=decision.state,
                current_step=decision.current_step,
                token=decision.token,
                version=1,
                payload=_json(dict(new.payload)),
                created_at=now,
                updated_at=now,
                deadline_at=None if new.deadline_at is None else _utc(new.deadline_at),
                due_at=decision.due_at,
                admitted=decision.admitted,
                steps=tuple(
                    StepRecord(i, name, StepStatus.PENDING) for i, name in enumerate(new.step_names)
                ),
            )
            saga, written = self._apply_decision(saga, decision, messages, now)
            self._sagas[saga.saga_id] = saga
            self._hashes[saga.saga_id] = new.payload_hash
            self._keys[(new.name, new.business_key)] = saga.saga_id
            return CreateResult(_copy(saga), created=True, messages=written)

    def commit(
        self,
        saga: SagaRecord,
        decision: Decision,
        messages: Sequence[OutboxMessage],
        now: datetime,
    ) -> tuple[OutboxMessage, ...]:
        return self._commit("commit", saga, decision, messages, now)

    def mark_sent(self, message_ids: Sequence[int], now: datetime) -> None:
        now = _utc(now)
        with self._lock:
            self.calls.append("mark_sent")
            for message_id in message_ids:
                message = self._outbox.get(message_id)
                if message is not None and message.sent_at is None:
                    self._outbox[message_id] = replace(message, sent_at=now)

    def begin_guard(self, key: str, now: datetime) -> GuardRecord | None:
        now = _utc(now)
        with self._lock:
            self.calls.append("begin_guard")
            guard = self._guards.setdefault(key, GuardRecord(key, STARTED, recorded_at=now))
            return None if guard.outcome == STARTED else replace(guard, result=_json(guard.result))

    def put_guard(self, guard: GuardRecord, now: datetime) -> GuardRecord:
        now = _utc(now)
        with self._lock:
            self.calls.append("put_guard")
            recorded = self._guards.get(guard.key)
            if recorded is None or recorded.outcome == STARTED:
                result = _json(guard.result)
                self._guards[guard.key] = GuardRecord(
                    guard.key, guard.outcome, result, guard.error, now
                )
            recorded = self._guards[guard.key]
            return replace(recorded, result=_json(recorded.result))

    # -- reads -------------------------------------------------------------------------

    def load(self, saga_id: str) -> SagaRecord | None:
        with self._lock:
            self.calls.append("load")
            saga = self._sagas.get(saga_id)
            return _copy(saga) if saga else None

    def find(self, ref: str) -> SagaRecord | None:
        with self._lock:
            self.calls.append("find")
            saga = self._sagas.get(ref)
            if saga is None:
                same_key = [s for s in self._sagas.values() if s.business_key == ref]
                saga = max(same_key, key=lambda s: s.created_at, default=None)
            return _copy(saga) if saga else None

    def unsent(self, created_before: datetime, limit: int) -> tuple[OutboxMessage, ...]:
        created_before = _utc(created_before)
        with self._lock:
            self.calls.append("unsent")
            pending = [
                replace(m, body=_json(m.body))
                for _, m in sorted(self._outbox.items())
                if m.sent_at is None and m.created_at is not None and m.created_at < created_before
            ]
            return tuple(pending[:limit])

    def get_guard(self, key: str) -> GuardRecord | None:
        with self._lock:
            self.calls.append("get_guard")
            guard = self._guards.get(key)
            return replace(guard, result=_json(guard.result)) if guard else None

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
                _copy(s, with_steps=False)  # like the SQL store: no steps in listings
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

    # -- what the scanner needs ----------------------------------------------------------

    def _claimed(self, sagas: Sequence[SagaRecord]) -> MemoryClaim:
        """Copies with the current step's ``started`` flag (its guard row exists)."""
        records = []
        for saga in sagas:
            started = current_execution_key(saga) in self._guards
            steps = tuple(
                replace(s, started=started) if s.index == saga.current_step else s
                for s in saga.steps
            )
            records.append(replace(_copy(saga), steps=steps))
        return MemoryClaim(self, tuple(records))

    @contextmanager
    def claim_due(self, now: datetime, limit: int) -> Iterator[MemoryClaim]:
        now = _utc(now)
        with self._transaction("claim_due"):
            due = [s for s in self._sagas.values() if s.due_at is not None and s.due_at <= now]
            due.sort(key=lambda s: s.due_at or now)
            yield self._claimed(due[:limit])

    @contextmanager
    def claim_waiting(self, name: str, max_concurrent: int) -> Iterator[MemoryClaim]:
        with self._transaction("claim_waiting"):
            mine = [s for s in self._sagas.values() if s.name == name]
            running = sum(1 for s in mine if s.admitted and s.state in LIVE_STATES)
            waiting = sorted((s for s in mine if _waiting(s)), key=_oldest_first)
            yield self._claimed(waiting[: max(0, max_concurrent - running)])

    def waiting_names(self) -> tuple[str, ...]:
        with self._lock:
            self.calls.append("waiting_names")
            return tuple(sorted({s.name for s in self._sagas.values() if _waiting(s)}))

    def report_stuck(
        self, older_than: datetime, now: datetime, limit: int
    ) -> tuple[SagaRecord, ...]:
        older_than, now = _utc(older_than), _utc(now)
        with self._transaction("report_stuck"):
            stuck = sorted(
                (
                    s
                    for s in self._sagas.values()
                    if s.finished_at is None
                    and s.created_at < older_than
                    and s.saga_id not in self._stuck_reported
                ),
                key=_oldest_first,
            )[:limit]
            for saga in stuck:
                self._stuck_reported[saga.saga_id] = now
            return tuple(_copy(s, with_steps=False) for s in stuck)


def _waiting(saga: SagaRecord) -> bool:
    """Never admitted and still STARTED. (SqlSagaStore also counts sagas that failed while
    waiting, which then take the free slots for ever: see the contract suite.)"""
    return not saga.admitted and saga.state == SagaState.STARTED


def _oldest_first(saga: SagaRecord) -> tuple[datetime, str]:
    return saga.created_at, saga.saga_id


def _newest_first(sagas: list[SagaRecord]) -> list[SagaRecord]:
    """``ORDER BY created_at DESC, id``."""
    by_id = sorted(sagas, key=lambda s: s.saga_id)
    return sorted(by_id, key=lambda s: s.created_at, reverse=True)


if TYPE_CHECKING:  # mypy proves the fake keeps the whole protocol
    _conforms: SagaStore = InMemorySagaStore()


class RecordingDispatcher:
    """A ``Dispatcher`` that keeps what it was asked to publish in ``sent``.

    ``fail_next=n`` makes the next ``n`` sends raise ``ConnectionError`` (a broker outage):
    those messages stay unsent in the outbox, for the relay.
    """

    def __init__(self, fail_next: int = 0) -> None:
        self.sent: list[OutboxMessage] = []
        self.fail_next = fail_next
        self._lock = threading.Lock()

    def send(self, message: OutboxMessage) -> None:
        with self._lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                raise ConnectionError(f"simulated publish failure of outbox {message.id}")
            self.sent.append(message)


# -- the driver ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Delivery:
    message: OutboxMessage
    step: Step
    role: str  # "action" | "compensation"
    function: StepFunction


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _run(delivery: _Delivery, context: StepContext, now: datetime) -> tuple[GuardRecord, int]:
    """Call the participant, retrying as its policy says (without waiting); returns the
    outcome and the number of attempts it took."""
    step, key = delivery.step, context.idempotency_key
    while True:
        try:
            return GuardRecord(key, "ok", delivery.function(context)), context.attempt
        except Exception as exc:
            if delivery.role == "action" and isinstance(exc, tuple(step.business_errors)):
                return GuardRecord(key, "business", error=_describe(exc)), context.attempt
            if delivery.role == "action":
                policy, retryable = step.retry, isinstance(exc, tuple(step.retry_on))
            else:
                policy, retryable = step.compensation_retry, True
            if not isinstance(decide_retry(policy, context.attempt, retryable, now), RetryAt):
                return GuardRecord(key, "error", error=_describe(exc)), context.attempt
            context = replace(context, attempt=context.attempt + 1)


def _event(delivery: _Delivery, outcome: GuardRecord, attempts: int | None) -> Event:
    index, token = delivery.message.body["step"], delivery.message.body["token"]
    error = outcome.error or "unknown error"
    if delivery.role == "action":
        if outcome.outcome == "ok":
            return StepSucceeded(index, token, outcome.result, attempts)
        return StepFailed(index, token, error, outcome.outcome == "business", attempts)
    if outcome.outcome == "ok":
        return CompensationSucceeded(index, token, outcome.result, attempts)
    return CompensationFailed(index, token, error, attempts)


def _deliver(
    coordinator: Coordinator,
    store: SagaStore,
    dispatcher: RecordingDispatcher,
    delivery: _Delivery,
) -> None:
    """What the step task and the reply task do: guard, run, record, advance, publish."""
    body = delivery.message.body
    outcome = store.begin_guard(body["key"], coordinator.clock())
    attempts = None  # a duplicate delivery: the recorded outcome, attempts unknown
    if outcome is None:
        context = StepContext(
            saga_id=body["saga_id"],
            saga=body["saga"],
            step=delivery.step.name,
            payload=body["payload"],
            results=body.get("results", {}),
            idempotency_key=body["key"],
            result=body.get("result"),
        )
        outcome, attempts = _run(delivery, context, coordinator.clock())
        if not (outcome.outcome == "error" and delivery.role == "compensation"):
            # As the real task: a failed compensation is not recorded (it may be retried).
            outcome = store.put_guard(outcome, coordinator.clock())
    handled = coordinator.handle(body["saga_id"], _event(delivery, outcome, attempts))
    outbox.publish(store, dispatcher, handled.messages, coordinator.clock)


def _delivery(
    coordinator: Coordinator, message: OutboxMessage, participants: Mapping[str, StepFunction]
) -> _Delivery:
    body = message.body
    saga = coordinator.definition(body["saga"])
    index = body["step"]
    step = saga.steps[index]
    if body["kind"] == "action":
        task, function = saga.step_task_name(index), step.action
    else:
        task, function = saga.compensation_task_name(index), step.compensation
    return _Delivery(message, step, body["kind"], participants.get(task, function))


def run_until_settled(
    coordinator: Coordinator,
    store: SagaStore,
    dispatcher: RecordingDispatcher,
    saga_id: str,
    participants: Mapping[str, StepFunction] | None = None,
    *,
    max_deliveries: int = 1000,
) -> SagaRecord:
    """Deliver the saga's published messages, in order, until it settles; returns it.

    Each message is run like the Celery step task would (``begin_guard`` first, outcome
    recorded, retries per the step's policy but without waiting), its outcome becomes the
    machine event handed to ``coordinator.handle``, and the new outbox messages are
    published to ``dispatcher``. Messages left unsent (``fail_next``) are relayed.
    ``participants`` overrides the definition's functions by task name, e.g.
    ``{"order.charge": fake_charge, "order.refund": fake_refund}``.
    """
    overrides = participants or {}
    cursor, budget = 0, max_deliveries
    while True:
        record = store.load(saga_id)
        if record is None:
            raise SagaNotFoundError(f"saga {saga_id} not found", saga_id=saga_id)
        if record.state in SETTLED_STATES:
            return record
        budget -= 1
        if budget < 0:
            raise SagaError(f"saga {saga_id} did not settle in {max_deliveries} deliveries")
        sent = dispatcher.sent
        found = next((i for i in range(cursor, len(sent)) if sent[i].saga_id == saga_id), None)
        if found is None:
            # What the beat relay does: republish the rows left unsent after a failed publish.
            later = coordinator.clock() + timedelta(days=1)
            unsent = [m for m in store.unsent(later, max_deliveries) if m.saga_id == saga_id]
            if not unsent:
                raise SagaError(f"saga {saga_id} is {record.state} but has nothing to deliver")
            outbox.publish(store, dispatcher, unsent, coordinator.clock)
            continue
        cursor = found + 1
        _deliver(coordinator, store, dispatcher, _delivery(coordinator, sent[found], overrides))
