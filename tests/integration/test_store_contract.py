"""One contract for every ``SagaStore``: the in-memory fake, SQLite and PostgreSQL.

Each test gets an empty store. PostgreSQL uses one fresh database per module (migrated once,
its tables truncated before each test); it is skipped when the server is down, except under
``CI``, where that is a failure.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from celery_sagas import dlq, machine, outbox
from celery_sagas.coordinator import Coordinator, payload_hash
from celery_sagas.definition import Saga, Step, StepContext, registry
from celery_sagas.errors import (
    BusinessError,
    ConcurrentUpdateError,
    PayloadConflictError,
    SagaError,
)
from celery_sagas.machine import (
    Begin,
    DeadLetterChange,
    Decision,
    ErrorKind,
    SagaState,
    SagaView,
    SendToDeadLetterQueue,
    StepFailed,
    StepStatus,
    StepSucceeded,
    StepView,
)
from celery_sagas.policy import RetryPolicy
from celery_sagas.protocols import (
    STARTED,
    CreateResult,
    DeadLetterRecord,
    Expectation,
    GuardRecord,
    NewSaga,
    OutboxMessage,
    SagaRecord,
    SagaStore,
)
from celery_sagas.store import SqlSagaStore, shared_engine, upgrade
from celery_sagas.store.choreography import ChoreographyStore
from celery_sagas.store.service_outbox import ServiceOutbox
from celery_sagas.testing import InMemorySagaStore, RecordingDispatcher, run_until_settled
from tests.conftest import require_service
from tests.support.databases import create_pg_database, drop_pg_database

TABLES = (
    "saga",
    "saga_step",
    "saga_transition",
    "saga_outbox",
    "saga_guard",
    "saga_dead_letter",
    "saga_attempt",
)
STEP_NAMES = ("reserve", "charge", "ship", "notify")
T0 = datetime(2030, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# --------------------------------------------------------------------------- backends


@dataclass
class Backend:
    name: str
    store: SagaStore
    rows: Callable[[], dict[str, int]]


def _sql_rows(store: SqlSagaStore) -> Callable[[], dict[str, int]]:
    def rows() -> dict[str, int]:
        with store.engine.connect() as conn:
            return {
                table: conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
                for table in TABLES
            }

    return rows


@pytest.fixture(scope="module")
def contract_pg_url() -> Iterator[str]:
    """One migrated PostgreSQL database for this module (tables truncated per test)."""
    require_service("postgresql")
    url = create_pg_database("sagas_contract")
    upgrade(url)
    yield url
    shared_engine(url).dispose()
    drop_pg_database(url)


def on_psycopg3(url: str, **query: str) -> str:
    """``url`` (psycopg2's) with the psycopg 3 driver (and ``query``: an engine of its own)."""
    parsed = make_url(url).set(drivername="postgresql+psycopg").update_query_dict(query)
    return parsed.render_as_string(hide_password=False)


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        "postgresql",
        "postgresql-unprepared",
        "psycopg3",
        "psycopg3-unprepared",
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Every store: in memory, SQLite, PostgreSQL (hot statements prepared per connection)
    and PostgreSQL without prepared statements (``prepared_statements=False``), each on
    psycopg2 and on psycopg 3 (which prepares statements itself)."""
    if request.param == "memory":
        memory = InMemorySagaStore()
        yield Backend("memory", memory, memory.row_counts)
        return
    if request.param == "sqlite":
        url = f"sqlite+pysqlite:///{tmp_path / 'contract.sqlite3'}"
        upgrade(url)
    else:
        url = request.getfixturevalue("contract_pg_url")
        with shared_engine(url).begin() as conn:
            conn.execute(sa.text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
        if request.param.startswith("psycopg3"):
            # engines are per URL: the unprepared store's (prepare_threshold=None) apart
            url = on_psycopg3(url, application_name=request.param)
    store = SqlSagaStore(url, prepare=not request.param.endswith("-unprepared"))
    yield Backend(request.param, store, _sql_rows(store))
    if request.param == "sqlite":
        store.engine.dispose()


# --------------------------------------------------------------------------- helpers


def begin_decision(
    saga_id: str,
    name: str = "toy",
    now: datetime = T0,
    timeout: float | None = None,
    admit: bool = True,
    deadline_at: datetime | None = None,
) -> Decision:
    steps = tuple(
        StepView(i, step, StepStatus.PENDING, timeout=timeout) for i, step in enumerate(STEP_NAMES)
    )
    view = SagaView(saga_id, name, None, 0, 0, steps, deadline_at=deadline_at)
    return machine.decide(view, Begin(admit=admit), now)


def create(
    store: SagaStore,
    key: str = "order-1",
    payload: Mapping[str, Any] | None = None,
    now: datetime = T0,
    name: str = "toy",
    saga_id: str | None = None,
    timeout: float | None = None,
    admit: bool = True,
    deadline_at: datetime | None = None,
    messages: Callable[[str, Decision], list[OutboxMessage]] | None = None,
    definition: str | None = None,
) -> CreateResult:
    """Create a 4-step saga; ``timeout`` gives every step one, ``admit=False`` leaves it
    waiting for a slot; ``messages`` builds its outbox rows (``step_message`` if None)."""
    payload = {"id": key, "items": [{"sku": "BOOK", "qty": 2}]} if payload is None else payload
    saga_id = saga_id or f"{name}-{key}-{now.timestamp()}"
    hashed = payload_hash(payload)
    new = NewSaga(saga_id, name, key, payload, hashed, STEP_NAMES, deadline_at, definition)
    decision = begin_decision(saga_id, name, now, timeout, admit, deadline_at)
    return store.create(new, decision, (messages or step_message)(saga_id, decision), now)


def step_message(saga_id: str, decision: Decision) -> list[OutboxMessage]:
    return [
        OutboxMessage(saga_id, {"kind": "dead_letter", "step": c.step})
        if isinstance(c, SendToDeadLetterQueue)
        else OutboxMessage(saga_id, {"step": c.step, "token": c.token})
        for c in decision.commands
    ]


def keyed_message(saga_id: str, decision: Decision) -> list[OutboxMessage]:
    """As ``step_message``, but a step message carries its guard ``key`` (as the
    coordinator's do): the store keeps it in the outbox row's ``key`` column."""
    return [
        m
        if m.body.get("kind") == "dead_letter"
        else replace(m, body={**m.body, "key": f"{saga_id}:{m.body['step']}"})
        for m in step_message(saga_id, decision)
    ]


def with_dead_letter(saga_id: str, decision: Decision) -> list[OutboxMessage]:
    """A keyed step message and a dead letter message (no key)."""
    return [*keyed_message(saga_id, decision), OutboxMessage(saga_id, {"kind": "dead_letter"})]


def advance(
    store: SagaStore,
    record: SagaRecord,
    event: machine.Event,
    now: datetime,
    timeouts: tuple[float | None, ...] = (),
) -> tuple[SagaRecord, tuple[OutboxMessage, ...]]:
    """Decide and commit one event; returns the reloaded saga and the written messages."""
    decision = machine.decide(record.view(timeouts), event, now)
    assert decision.accepted, decision.note
    written = store.commit(record, decision, step_message(record.saga_id, decision), now)
    loaded = store.load(record.saga_id)
    assert loaded is not None
    return loaded, written


def update(
    store: SagaStore,
    saga_id: str,
    decide: Callable[[SagaRecord], tuple[Decision, list[OutboxMessage]]],
    now: datetime,
    guard: GuardRecord | None = None,
    known: SagaRecord | None = None,
) -> tuple[SagaRecord | None, Decision | None, tuple[OutboxMessage, ...]]:
    """What the coordinator does with one event: load (or take ``known``), decide, and
    ``write`` an accepted decision (``put_guard`` alone otherwise)."""
    record = known or store.load(saga_id)
    if record is None:
        if guard is not None:
            store.put_guard(guard, now)
        return None, None, ()
    decision, messages = decide(record)
    if not decision.accepted:
        if guard is not None:
            store.put_guard(guard, now)
        return record, decision, ()
    return record, decision, store.write(record, decision, messages, now, guard)


def utc_offset_is_zero(when: datetime | None) -> bool:
    return when is not None and when.utcoffset() == timedelta(0)


# --------------------------------------------------------------------------- create / load


def test_create_then_load_round_trips_everything(backend: Backend) -> None:
    store = backend.store
    payload = {"id": "order-1", "items": [{"sku": "BOOK", "qty": 2}], "note": "ü €"}
    in_paris = T0.astimezone(timezone(timedelta(hours=2)))
    created = create(store, payload=payload, now=in_paris)
    assert created.created
    assert [m.id for m in created.messages] == [1]
    assert created.messages[0].created_at == T0

    loaded = store.load(created.record.saga_id)
    assert loaded == created.record
    assert loaded is not None
    assert (loaded.name, loaded.business_key, loaded.state) == ("toy", "order-1", "STARTED")
    assert (loaded.current_step, loaded.token, loaded.version) == (0, 1, 1)
    assert loaded.payload == payload
    assert loaded.created_at == loaded.updated_at == T0
    assert utc_offset_is_zero(loaded.created_at) and utc_offset_is_zero(loaded.updated_at)
    assert loaded.reason is None and loaded.finished_at is None
    first, *rest = loaded.steps
    assert (first.index, first.name, first.status) == (0, "reserve", "running")
    assert (first.attempts, first.compensation_attempts) == (0, 0)  # counted when it finishes
    assert first.started_at == T0 and utc_offset_is_zero(first.started_at)
    assert first.finished_at is None and first.result is None
    assert [(s.index, s.name, s.status, s.attempts) for s in rest] == [
        (i, STEP_NAMES[i], StepStatus.PENDING, 0) for i in (1, 2, 3)
    ]
    assert all(s.started_at is None for s in rest)
    assert [(t.step, t.old, t.new, t.actor, t.at) for t in store.transitions(loaded.saga_id)] == [
        (None, "-", "STARTED", "coordinator", T0),
        ("reserve", "pending", "running", "coordinator", T0),
    ]
    assert backend.rows() == {
        "saga": 1,
        "saga_step": 4,
        "saga_transition": 2,
        "saga_outbox": 1,
        "saga_guard": 0,
        "saga_dead_letter": 0,
        "saga_attempt": 0,
    }


def test_create_returns_exactly_what_a_load_returns(backend: Backend) -> None:
    payload = {"id": "order-1", "pair": (1, 2)}
    in_paris = T0.astimezone(timezone(timedelta(hours=2)))
    created = create(backend.store, payload=payload, now=in_paris, deadline_at=in_paris)
    assert created.record.payload is not payload
    assert created.record.payload == {"id": "order-1", "pair": [1, 2]}
    assert utc_offset_is_zero(created.record.created_at)
    assert utc_offset_is_zero(created.record.deadline_at)
    assert utc_offset_is_zero(created.record.steps[0].started_at)
    assert created.record == backend.store.load(created.record.saga_id)


def test_unknown_saga_loads_as_none(backend: Backend) -> None:
    assert backend.store.load("nope") is None
    assert backend.store.find("nope") is None
    assert backend.store.transitions("nope") == ()


def test_same_key_and_payload_returns_the_existing_saga_and_writes_nothing(
    backend: Backend,
) -> None:
    first = create(backend.store, saga_id="first")
    rows = backend.rows()
    again = create(backend.store, saga_id="second", now=at(5))
    assert not again.created
    assert again.record.saga_id == "first"
    assert again.record == first.record
    assert again.messages == ()
    assert backend.rows() == rows
    assert backend.rows()["saga_outbox"] == 1
    assert backend.store.load("second") is None


def test_same_key_with_another_payload_conflicts_and_writes_nothing(backend: Backend) -> None:
    create(backend.store, saga_id="first")
    rows = backend.rows()
    with pytest.raises(PayloadConflictError) as raised:
        create(backend.store, payload={"id": "order-1", "items": []}, saga_id="second")
    assert raised.value.details["saga_id"] == "first"
    assert raised.value.details["business_key"] == "order-1"
    assert backend.rows() == rows
    assert backend.store.load("second") is None


def test_the_same_key_under_another_saga_name_is_another_saga(backend: Backend) -> None:
    create(backend.store, name="toy", saga_id="a")
    other = create(backend.store, name="other", saga_id="b", payload={"id": "x"})
    assert other.created
    assert backend.rows()["saga"] == 2


def test_a_saga_id_already_taken_is_a_saga_error_and_writes_nothing(backend: Backend) -> None:
    create(backend.store, key="k1", saga_id="same")
    rows = backend.rows()
    with pytest.raises(SagaError):
        create(backend.store, key="k2", saga_id="same")
    assert backend.rows() == rows


# --------------------------------------------------------------------------- commit


def test_commit_applies_step_changes_transitions_and_outbox(backend: Backend) -> None:
    store = backend.store
    record = create(store).record
    succeeded = StepSucceeded(0, 1, {"reservation": [1, 2]}, attempts=2)
    record, written = advance(store, record, succeeded, at(1))
    assert [m.id for m in written] == [2]
    assert written[0].created_at == at(1) and written[0].body == {"step": 1, "token": 2}
    assert (record.state, record.current_step, record.token, record.version) == (
        SagaState.PENDING,
        1,
        2,
        2,
    )
    assert record.created_at == T0 and record.updated_at == at(1)
    done, running = record.steps[0], record.steps[1]
    assert done.status == StepStatus.COMPLETED and done.result == {"reservation": [1, 2]}
    assert (done.started_at, done.finished_at, done.attempts) == (T0, at(1), 2)
    assert running.status == StepStatus.RUNNING
    assert (running.started_at, running.finished_at, running.attempts) == (at(1), None, 0)

    declined = StepFailed(1, 2, "card declined", business=True, attempts=1)
    record, written = advance(store, record, declined, at(2))
    assert [(m.id, m.body) for m in written] == [(3, {"step": 0, "token": 3})]  # compensation
    assert record.state == SagaState.COMPENSATING
    assert record.reason == "charge failed: card declined"
    failed = record.steps[1]
    assert (failed.status, failed.error, failed.error_kind) == (
        StepStatus.FAILED,
        "card declined",
        ErrorKind.BUSINESS,
    )
    assert (failed.finished_at, failed.attempts) == (at(2), 1)
    assert [s.status for s in record.steps[2:]] == [StepStatus.SKIPPED] * 2
    compensating = record.steps[0]
    assert compensating.status == StepStatus.COMPENSATING
    assert compensating.compensation_started_at == at(2)

    record, _ = advance(store, record, machine.CompensationSucceeded(0, 3, attempts=3), at(3))
    assert record.state == SagaState.FAILED
    assert record.finished_at == at(3) and utc_offset_is_zero(record.finished_at)
    assert record.reason == "charge failed: card declined"  # kept: the decision had none
    undone = record.steps[0]
    assert (undone.compensation_finished_at, undone.compensation_attempts) == (at(3), 3)
    assert undone.attempts == 2  # the forward count is kept
    assert record.steps[0].result == {"reservation": [1, 2]}  # kept after compensation

    log = [(t.step, t.old, t.new, t.at) for t in store.transitions(record.saga_id)]
    assert log == [
        (None, "-", "STARTED", T0),
        ("reserve", "pending", "running", T0),
        ("reserve", "running", "completed", at(1)),
        (None, "STARTED", "PENDING", at(1)),
        ("charge", "pending", "running", at(1)),
        ("charge", "running", "failed", at(2)),
        ("ship", "pending", "skipped", at(2)),
        ("notify", "pending", "skipped", at(2)),
        (None, "PENDING", "COMPENSATING", at(2)),
        ("reserve", "completed", "compensating", at(2)),
        ("reserve", "compensating", "compensated", at(3)),
        (None, "COMPENSATING", "FAILED", at(3)),
    ]
    assert backend.rows()["saga_outbox"] == 3  # step 0, step 1, compensation of step 0


def test_a_reply_without_attempts_keeps_the_count(backend: Backend) -> None:
    record = create(backend.store).record
    record, _ = advance(backend.store, record, StepSucceeded(0, 1, "r", attempts=None), at(1))
    assert record.steps[0].attempts == 0
    record, _ = advance(backend.store, record, StepFailed(1, 2, "x", False, attempts=4), at(2))
    assert record.steps[1].attempts == 4
    record, _ = advance(backend.store, record, machine.CompensationFailed(1, 3, "y"), at(3))
    assert record.steps[1].compensation_attempts == 0
    assert record.state == SagaState.COMPENSATION_FAILED
    assert record.finished_at is None  # not terminal: an operator can still resume it


def test_stale_version_is_refused_and_writes_nothing(backend: Backend) -> None:
    store = backend.store
    stale = create(store).record
    current, _ = advance(store, stale, StepSucceeded(0, 1, "r"), at(1))
    rows = backend.rows()
    decision = machine.decide(stale.view(), StepSucceeded(0, 1, "again"), at(2))
    with pytest.raises(ConcurrentUpdateError):
        store.commit(stale, decision, step_message(stale.saga_id, decision), at(2))
    assert backend.rows() == rows
    assert store.load(stale.saga_id) == current


def in_two_threads(work: Callable[[str], str]) -> list[str]:
    """Run ``work("a")`` and ``work("b")`` at the same moment; returns what they returned."""
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def run(who: str) -> None:
        barrier.wait()
        outcomes.append(work(who))

    threads = [threading.Thread(target=run, args=(who,)) for who in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(outcomes) == 2, "a thread died or hung"
    return sorted(outcomes)


RACE_ROUNDS = 5


def test_two_threads_committing_one_version_exactly_one_wins(backend: Backend) -> None:
    store = backend.store
    for round_ in range(RACE_ROUNDS):
        record = create(store, key=f"race-{round_}").record

        def commit(who: str, record: SagaRecord = record) -> str:
            decision = machine.decide(record.view(), StepSucceeded(0, 1, who), at(1))
            try:
                store.commit(record, decision, step_message(record.saga_id, decision), at(1))
            except ConcurrentUpdateError:
                return "lost"
            return who

        winner, loser = in_two_threads(commit)
        assert loser == "lost" and winner in ("a", "b")
        loaded = store.load(record.saga_id)
        assert loaded is not None
        assert loaded.version == 2 and loaded.steps[0].result == winner
        assert len(store.transitions(record.saga_id)) == 2 + 3  # created + one commit
    assert backend.rows()["saga_outbox"] == RACE_ROUNDS * 2


def test_two_threads_creating_one_business_key_make_one_saga(backend: Backend) -> None:
    store = backend.store
    for round_ in range(RACE_ROUNDS):

        def start(who: str, key: str = f"dup-{round_}") -> str:
            result = create(store, key=key, saga_id=f"{key}-{who}")
            return f"{result.created}:{result.record.saga_id}"

        first, second = in_two_threads(start)
        (created_a, id_a), (created_b, id_b) = first.split(":"), second.split(":")
        assert {created_a, created_b} == {"True", "False"}
        assert id_a == id_b
    assert backend.rows()["saga"] == RACE_ROUNDS
    assert backend.rows()["saga_outbox"] == RACE_ROUNDS


# --------------------------------------------------------------------------- outbox


def test_unsent_and_mark_sent(backend: Backend) -> None:
    store = backend.store
    a = create(store, saga_id="a", messages=keyed_message).record  # outbox 1 at T0
    b = create(store, "order-2", now=at(1), saga_id="b", messages=with_dead_letter)  # 2, 3
    c = create(store, "order-3", now=at(2), saga_id="c", messages=keyed_message)  # outbox 4
    assert [m.id for m in b.messages] == [2, 3] and [m.id for m in c.messages] == [4]

    assert store.unsent(T0, 10) == ()  # strictly older than created_before
    assert [m.id for m in store.unsent(at(1), 10)] == [1]
    everything = store.unsent(at(3), 10)
    assert [(m.id, m.saga_id, m.created_at) for m in everything] == [
        (1, "a", T0),
        (2, "b", at(1)),
        (3, "b", at(1)),
        (4, "c", at(2)),
    ]
    assert everything[1].body == {"step": 0, "token": 1, "key": "b:0"}
    assert everything[2].body == {"kind": "dead_letter"}
    assert all(m.sent_at is None for m in everything)
    assert [m.id for m in store.unsent(at(3), 2)] == [1, 2]

    # A commit of saga a marks all its unsent rows sent (the saga moved on, so they were
    # delivered) before writing its new row 5; the other sagas' rows are untouched.
    decision = machine.decide(a.view(), StepSucceeded(0, 1, None), at(3))
    written = store.commit(a, decision, keyed_message("a", decision), at(3))
    assert [(m.id, m.created_at) for m in written] == [(5, at(3))]
    assert [m.id for m in store.unsent(at(9), 10)] == [2, 3, 4, 5]

    # A row whose key has a guard row (a worker took the message) is not unsent, whatever
    # the guard's outcome, "started" included; a dead letter row has no key.
    assert store.begin_guard("b:0", at(4)) is None  # started
    assert [m.id for m in store.unsent(at(9), 10)] == [3, 4, 5]
    store.put_guard(GuardRecord("c:0", "ok", {"done": True}), at(4))
    assert [m.id for m in store.unsent(at(9), 10)] == [3, 5]
    assert store.get_guard("c:0") is not None

    # The dead letter row stays unsent until mark_sent.
    store.mark_sent([3], at(5))
    store.mark_sent([], at(5))
    store.mark_sent([3, 999], at(6))  # again, and an unknown id: harmless
    assert [m.id for m in store.unsent(at(9), 10)] == [5]
    store.mark_sent([5], at(7))
    assert store.unsent(at(9), 10) == ()
    assert backend.rows()["saga_outbox"] == 5


def test_a_started_marker_handed_over_names_the_new_delivery_and_dropped_frees_the_relay(
    backend: Backend,
) -> None:
    """``inline_steps``: a retry from an inline run takes its step's marker over; a step
    whose delivery died loses it, so the relay publishes its row again. Only the marker
    that names the given delivery moves; a final outcome never does."""
    store = backend.store
    create(store, saga_id="b", messages=keyed_message)  # its step row: key "b:0"
    store.begin_guard("b:0", at(1), "outer")
    assert store.unsent(at(9), 10) == ()  # taken: the relay leaves it alone
    assert not store.hand_over_started("b:0", "someone-else", "retry")
    assert store.hand_over_started("b:0", "outer", "retry")
    moved = store.get_guard("b:0")
    assert moved is not None and (moved.outcome, moved.result) == (STARTED, "retry")
    assert not store.hand_over_started("b:0", "outer", None)  # it names "retry" now
    assert store.hand_over_started("b:0", "retry", None)
    assert store.get_guard("b:0") is None
    assert [m.body["key"] for m in store.unsent(at(9), 10)] == ["b:0"]  # the relay's again
    store.put_guard(GuardRecord("b:0", "ok", {"done": True}), at(2))
    assert not store.hand_over_started("b:0", "retry", None)
    assert store.get_guard("b:0") is not None


def test_a_heartbeat_moves_only_the_marker_its_delivery_still_holds(backend: Backend) -> None:
    """``beat_started``: the marker named by its delivery (or by None: any) takes the
    beat's time; another delivery's marker and a final outcome stay as they are."""
    store = backend.store
    create(store, saga_id="b", messages=keyed_message)
    store.begin_guard("b:0", at(1), "outer")
    assert store.beat_started({}, at(5)) == 0
    assert store.beat_started({"b:0": "someone-else"}, at(5)) == 0
    assert store.beat_started({"b:0": "outer", "missing:0": None}, at(5)) == 1
    beaten = store.get_guard("b:0")
    assert beaten is not None and (beaten.outcome, beaten.result) == (STARTED, "outer")
    assert beaten.recorded_at == at(5)
    assert store.beat_started({"b:0": None}, at(6)) == 1
    assert store.get_guard("b:0").recorded_at == at(6)  # type: ignore[union-attr]
    assert store.unsent(at(9), 10) == ()  # still taken: the relay leaves it alone
    store.put_guard(GuardRecord("b:0", "ok", {"done": True}), at(7))
    assert store.beat_started({"b:0": "outer"}, at(8)) == 0
    final = store.get_guard("b:0")
    assert final is not None and (final.outcome, final.recorded_at) == ("ok", at(7))


def test_a_commit_marks_a_dead_letter_row_of_its_saga_sent_too(backend: Backend) -> None:
    store = backend.store
    record = create(store, saga_id="a", messages=with_dead_letter).record  # outbox 1, 2
    store.begin_guard("a:0", at(1))
    assert [m.id for m in store.unsent(at(9), 10)] == [2]
    decision = machine.decide(record.view(), StepSucceeded(0, 1, None), at(2))
    store.commit(record, decision, [], at(2))  # no new message: only the marking
    assert store.unsent(at(9), 10) == ()


def test_a_claim_commit_marks_the_rows_of_its_saga_sent(backend: Backend) -> None:
    store = backend.store
    create(store, saga_id="a", timeout=30, messages=keyed_message)  # outbox 1, due
    create(store, "order-2", saga_id="b", messages=keyed_message)  # outbox 2, never due
    with store.claim_due(at(11), 10) as claim:
        (due,) = claim.records
        decision = machine.decide(due.view(TIMEOUTS), machine.Tick(), at(11))
        assert decision.accepted
        written = claim.commit(due, decision, keyed_message("a", decision), at(11))
    assert [m.id for m in written] == [3]  # step 0 re-sent
    assert [m.id for m in store.unsent(at(20), 10)] == [2, 3]  # row 1 is marked sent


# --------------------------------------------------------------------------- update


@pytest.mark.parametrize(
    "event",
    [
        StepFailed(1, 2, "boom", False, attempts=4),  # running→failed, then →compensating
        machine.Cancel("bob", "stop"),  # the same two changes of the running step
    ],
    ids=["error", "cancel"],
)
def test_update_writes_two_changes_of_one_step_like_commit(
    backend: Backend, event: machine.Event
) -> None:
    """A decision that changes one step twice: ``update`` (one statement on PostgreSQL)
    leaves exactly what ``commit`` (the changes one after the other) leaves."""
    store = backend.store
    records = []
    for key in ("by-update", "by-commit"):
        record = create(store, key, saga_id=key).record
        records.append(advance(store, record, StepSucceeded(0, 1, "r"), at(1))[0])

    def decide(record: SagaRecord) -> tuple[Decision, list[OutboxMessage]]:
        decision = machine.decide(record.view(), event, at(2))
        return decision, keyed_message(record.saga_id, decision)

    _, decision, _ = update(store, "by-update", decide, at(2))
    assert decision is not None and decision.accepted
    advance(store, records[1], event, at(2))
    updated, committed = store.load("by-update"), store.load("by-commit")
    assert updated is not None and committed is not None
    assert updated.steps == committed.steps
    assert (updated.state, updated.reason) == (committed.state, committed.reason)
    failed = updated.steps[1]
    assert failed.status == StepStatus.COMPENSATING
    assert failed.error is not None and failed.error_kind is not None
    assert failed.finished_at == at(2)


def test_update_loads_decides_and_commits_in_one_call(backend: Backend) -> None:
    store = backend.store
    created = create(store, saga_id="u", messages=keyed_message)  # outbox 1
    twin = create(store, "order-2", saga_id="twin", messages=keyed_message)  # outbox 2
    rows = backend.rows()
    seen: list[SagaRecord] = []

    def stale(record: SagaRecord) -> tuple[Decision, list[OutboxMessage]]:
        seen.append(record)
        decision = machine.decide(record.view(), StepSucceeded(0, 99, "late"), at(1))
        return decision, keyed_message(record.saga_id, decision)

    record, decision, written = update(store, "u", stale, at(1))
    assert seen == [created.record] and record == created.record
    assert decision is not None and not decision.accepted
    assert written == ()
    assert backend.rows() == rows  # an ignored decision writes nothing
    assert store.load("u") == created.record
    assert [m.id for m in store.unsent(at(9), 10)] == [1, 2]  # not even the marking

    event = StepSucceeded(0, 1, {"reservation": [1, 2]}, attempts=2)

    def succeed(record: SagaRecord) -> tuple[Decision, list[OutboxMessage]]:
        decision = machine.decide(record.view(), event, at(2))
        return decision, keyed_message(record.saga_id, decision)

    record, decision, written = update(store, "u", succeed, at(2))
    assert record == created.record  # the record the decision was taken on
    assert decision is not None and decision.accepted and decision.state == SagaState.PENDING
    assert [(m.id, m.saga_id, m.created_at, m.body) for m in written] == [
        (3, "u", at(2), {"step": 1, "token": 2, "key": "u:1"})
    ]
    loaded = store.load("u")
    assert loaded is not None
    assert (loaded.version, loaded.current_step, loaded.token) == (2, 1, 2)
    assert loaded.updated_at == at(2) and loaded.steps[0].result == {"reservation": [1, 2]}
    assert len(store.transitions("u")) == 2 + 3
    assert [m.id for m in store.unsent(at(9), 10)] == [2, 3]  # row 1 is marked sent

    # exactly what a commit of the same decision writes
    committed, _ = advance(store, twin.record, event, at(2))
    assert replace(loaded, saga_id="twin", business_key="order-2") == replace(
        committed, payload=loaded.payload
    )
    assert [(t.step, t.old, t.new, t.reason, t.at) for t in store.transitions("u")] == [
        (t.step, t.old, t.new, t.reason, t.at) for t in store.transitions("twin")
    ]


def test_update_of_an_unknown_saga_returns_nothing_and_writes_nothing(backend: Backend) -> None:
    store = backend.store
    create(store, saga_id="known")
    rows = backend.rows()

    def never(record: SagaRecord) -> tuple[Decision, list[OutboxMessage]]:
        raise AssertionError("decide called for an unknown saga")

    assert update(store, "nope", never, at(1)) == (None, None, ())
    assert backend.rows() == rows


def test_an_error_in_decide_writes_nothing(backend: Backend) -> None:
    store = backend.store
    created = create(store, saga_id="u")
    rows = backend.rows()

    def boom(record: SagaRecord) -> tuple[Decision, list[OutboxMessage]]:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        update(store, "u", boom, at(1))
    assert backend.rows() == rows
    assert store.load("u") == created.record


# --------------------------------------------------------------------------- guards


def test_guard_first_writer_wins(backend: Backend) -> None:
    store = backend.store
    key = "saga-1:reserve:action"
    assert store.get_guard(key) is None
    first = store.put_guard(GuardRecord(key, "ok", {"reserved": [1, 2]}), at(1))
    assert first == GuardRecord(key, "ok", {"reserved": [1, 2]}, None, at(1))
    second = store.put_guard(GuardRecord(key, "error", error="boom"), at(2))
    assert second == first
    assert store.get_guard(key) == first
    assert utc_offset_is_zero(first.recorded_at)
    assert backend.rows()["saga_guard"] == 1


# --------------------------------------------------------------------------- queries


def test_find_by_id_or_newest_with_the_business_key(backend: Backend) -> None:
    store = backend.store
    older = create(store, key="order-7", name="toy", saga_id="older").record
    newer = create(store, key="order-7", name="other", saga_id="newer", now=at(5)).record
    assert store.find("older") == older
    assert store.find("order-7") == newer
    assert store.find("order-8") is None


def test_list_and_count_by_state(backend: Backend) -> None:
    store = backend.store
    a = create(store, key="a", now=at(1), saga_id="a").record
    create(store, key="b", now=at(2), saga_id="b")
    create(store, key="c", now=at(3), saga_id="c", name="other")
    advance(store, a, StepFailed(0, 1, "declined", True), at(4))

    def ids(records: tuple[SagaRecord, ...]) -> list[str]:
        return [r.saga_id for r in records]

    assert ids(store.list_sagas()) == ["c", "b", "a"]  # newest first
    assert ids(store.list_sagas(limit=2)) == ["c", "b"]
    assert ids(store.list_sagas(state=SagaState.STARTED)) == ["c", "b"]
    assert ids(store.list_sagas(state=SagaState.FAILED)) == ["a"]
    assert ids(store.list_sagas(name="toy")) == ["b", "a"]
    assert ids(store.list_sagas(state=SagaState.STARTED, name="toy")) == ["b"]
    assert store.list_sagas(state=SagaState.COMPLETED) == ()
    listed = store.list_sagas(name="toy", limit=1)[0]
    assert (listed.state, listed.business_key, listed.version) == ("STARTED", "b", 1)
    assert dict(store.count_by_state()) == {"STARTED": 2, "FAILED": 1}


def test_list_orders_sagas_created_at_the_same_time_by_id(backend: Backend) -> None:
    for saga_id in ("m", "z", "a"):
        create(backend.store, key=saga_id, saga_id=saga_id, now=at(1))
    create(backend.store, key="later", saga_id="later", now=at(2))
    assert [r.saga_id for r in backend.store.list_sagas()] == ["later", "a", "m", "z"]


def test_count_by_state_of_an_empty_store(backend: Backend) -> None:
    assert dict(backend.store.count_by_state()) == {}
    assert backend.store.list_sagas() == ()


# --------------------------------------------------------------------------- deadlines

TIMEOUTS = (30.0,) * 4  # seconds per step: re-send after 10s (2 re-sends), time out at 30s


def test_create_stores_deadlines_due_time_and_admission(backend: Backend) -> None:
    store = backend.store
    record = create(store, timeout=30, deadline_at=at(600)).record
    assert (record.deadline_at, record.due_at, record.admitted) == (at(600), at(10), True)
    assert utc_offset_is_zero(record.due_at) and utc_offset_is_zero(record.deadline_at)
    first = record.steps[0]
    assert (first.deadline_at, first.redispatch_at, first.dispatches) == (None, at(10), 1)
    assert first.started is False  # only scans fill it in
    assert [(s.deadline_at, s.dispatches) for s in record.steps[1:]] == [(None, 0)] * 3

    waiting = create(store, key="waits", admit=False, deadline_at=at(600)).record
    assert (waiting.state, waiting.admitted, waiting.due_at) == ("STARTED", False, at(600))
    assert waiting.steps[0].status == StepStatus.PENDING
    assert backend.rows()["saga_outbox"] == 1  # nothing sent for the waiting saga


def test_commit_moves_step_timing_and_the_due_time(backend: Backend) -> None:
    store = backend.store
    record = create(store, timeout=30).record
    record, _ = advance(store, record, StepSucceeded(0, 1, "r"), at(1), TIMEOUTS)
    done, running = record.steps[0], record.steps[1]
    assert (done.deadline_at, done.redispatch_at, done.dispatches) == (None, None, 1)
    # no deadline yet: a step's own time counts from when a worker begins it
    assert (running.deadline_at, running.redispatch_at, running.dispatches) == (None, at(11), 1)
    assert record.due_at == at(11)

    record, written = advance(store, record, machine.Tick(), at(12), TIMEOUTS)  # re-send
    resent = record.steps[1]
    assert resent.status == StepStatus.RUNNING
    # the re-send interval doubles: 10 s, then 20 s
    assert (resent.dispatches, resent.redispatch_at, resent.deadline_at) == (2, at(32), None)
    assert resent.started_at == at(1)  # a re-send is not a new run
    assert [m.body for m in written] == [{"step": 1, "token": 2}]  # same token
    assert record.due_at == at(32)

    for index in (1, 2, 3):
        record, _ = advance(store, record, StepSucceeded(index, record.token, index), at(13))
    assert record.state == SagaState.COMPLETED
    assert record.due_at is None
    assert all(s.deadline_at is None and s.redispatch_at is None for s in record.steps)


def test_begin_guard_marks_started_then_answers_with_the_final_outcome(backend: Backend) -> None:
    store = backend.store
    key = "saga-1:charge:action"
    assert store.begin_guard(key, at(1)) is None  # go ahead
    assert store.begin_guard(key, at(2)) is None  # started, not finished: run it again
    started = store.get_guard(key)
    assert started is not None and started.outcome == STARTED
    final = store.put_guard(GuardRecord(key, "business", error="declined"), at(3))
    assert final == GuardRecord(key, "business", None, "declined", at(3))
    assert store.begin_guard(key, at(4)) == final  # a duplicate delivery
    assert store.put_guard(GuardRecord(key, "ok", "late"), at(5)) == final
    assert backend.rows()["saga_guard"] == 1


EXPECTED = Expectation(step=0, token=1, role="action")  # what a new saga waits for


def test_begin_step_is_begin_guard_plus_a_snapshot_of_the_saga(backend: Backend) -> None:
    store = backend.store
    record = create(store, saga_id="s").record
    key = "s:reserve:action"
    assert store.begin_step(key, "s", at(1), EXPECTED) == (None, record)  # go ahead
    started = store.get_guard(key)
    assert started is not None and started.outcome == STARTED
    assert started.recorded_at == at(1)
    assert store.begin_step(key, "s", at(2), EXPECTED) == (None, record)  # begun again
    again = store.get_guard(key)
    assert again is not None and again.recorded_at == at(2)  # the marker's time moves
    final = store.put_guard(GuardRecord(key, "ok", {"r": 1}), at(3))
    assert store.begin_step(key, "s", at(4), EXPECTED) == (final, record)  # a duplicate
    assert backend.rows()["saga_guard"] == 1


def test_the_started_marker_names_the_delivery_that_began_the_step(backend: Backend) -> None:
    """``inline_steps`` tells a dead delivery's step by its marker: the marker names the
    delivery (a redelivery under another task id takes it over), a final outcome
    replaces it, and a marker written without a delivery names none."""
    store = backend.store
    create(store, saga_id="s")
    key = "s:reserve:action"
    store.begin_step(key, "s", at(1), EXPECTED, "task-1")
    first = store.get_guard(key)
    assert first is not None and (first.outcome, first.result) == (STARTED, "task-1")
    store.begin_step(key, "s", at(2), EXPECTED, "task-2")
    again = store.get_guard(key)
    assert again is not None and (again.result, again.recorded_at) == ("task-2", at(2))
    store.put_guard(GuardRecord(key, "ok", {"r": 1}), at(3))
    final = store.get_guard(key)
    assert final is not None and (final.outcome, final.result) == ("ok", {"r": 1})
    store.begin_guard("s:other:action", at(4))
    unnamed = store.get_guard("s:other:action")
    assert unnamed is not None and (unnamed.outcome, unnamed.result) == (STARTED, None)
    store.begin_guard("s:third:action", at(5), "task-3")
    named = store.get_guard("s:third:action")
    assert named is not None and named.result == "task-3"


def test_begin_step_marks_only_under_the_definition_the_saga_started_with(
    backend: Backend,
) -> None:
    store = backend.store
    record = create(store, saga_id="d", definition="fp-1").record
    assert record.definition == "fp-1" and store.load("d") == record
    key = "d:reserve:action"
    other = Expectation(step=0, token=1, role="action", definition="fp-2")
    assert store.begin_step(key, "d", at(1), other) == (None, record)
    assert backend.rows()["saga_guard"] == 0  # another version's worker: nothing written
    same = Expectation(step=0, token=1, role="action", definition="fp-1")
    assert store.begin_step(key, "d", at(2), same) == (None, record)
    assert backend.rows()["saga_guard"] == 1


@pytest.mark.parametrize(
    "expectation",
    [
        Expectation(step=0, token=2, role="action"),
        Expectation(step=1, token=1, role="action"),
        Expectation(step=0, token=1, role="compensation"),
    ],
    ids=["other-token", "other-step", "other-role"],
)
def test_begin_step_writes_nothing_for_a_message_the_saga_does_not_expect(
    backend: Backend, expectation: Expectation
) -> None:
    store = backend.store
    record = create(store, saga_id="s").record
    assert store.begin_step("s:reserve:action", "s", at(1), expectation) == (None, record)
    assert store.begin_step("ghost:x:action", "ghost", at(2), EXPECTED) == (None, None)
    assert backend.rows()["saga_guard"] == 0  # no marker: not for a stale, nor a ghost


def test_update_decides_on_a_known_snapshot_and_refuses_a_stale_one(backend: Backend) -> None:
    store = backend.store
    snapshot = create(store, saga_id="k").record
    moved, _ = advance(store, snapshot, StepFailed(0, 1, "declined", True), at(2))  # FAILED

    def succeed(record: SagaRecord) -> tuple[Decision, list[OutboxMessage]]:
        decision = machine.decide(record.view(), StepSucceeded(0, 1, "late"), at(3))
        return decision, keyed_message(record.saga_id, decision)

    try:
        record, decision, written = update(store, "k", succeed, at(3), known=snapshot)
    except ConcurrentUpdateError:
        pass  # a store that decided on the stale snapshot: its compare-and-set refused it
    else:  # a store that loads the saga itself: the late success is ignored
        assert record == moved and decision is not None and not decision.accepted
        assert written == ()
    assert store.load("k") == moved

    # a current snapshot is decided on and written
    fresh = create(store, "order-2", saga_id="f").record
    record, decision, written = update(store, "f", succeed, at(3), known=fresh)
    assert decision is not None and decision.accepted and len(written) == 1
    loaded = store.load("f")
    assert loaded is not None and (loaded.version, loaded.current_step) == (2, 1)


def test_list_sagas_created_before_and_unfinished(backend: Backend) -> None:
    store = backend.store
    old = create(store, key="old", saga_id="old", now=at(1)).record
    create(store, key="new", saga_id="new", now=at(5))
    advance(store, old, StepFailed(0, 1, "no", True), at(6))  # FAILED: finished
    assert [r.saga_id for r in store.list_sagas(created_before=at(5))] == ["old"]
    assert [r.saga_id for r in store.list_sagas(unfinished=True)] == ["new"]
    assert store.list_sagas(created_before=at(5), unfinished=True) == ()


def test_claim_due_hands_out_due_sagas_oldest_due_first(backend: Backend) -> None:
    store = backend.store
    ids = [create(store, key=f"k{i}", now=at(i), timeout=30).record.saga_id for i in range(3)]
    create(store, key="no-timeout", now=at(0))  # nothing to watch: never due
    with store.claim_due(at(11), 10) as claim:
        assert [r.saga_id for r in claim.records] == ids[:2]  # due at 10 and 11
        assert all(len(r.steps) == 4 for r in claim.records)
    with store.claim_due(at(20), 1) as claim:
        assert [r.saga_id for r in claim.records] == ids[:1]

    store.begin_guard(f"{ids[0]}:reserve:action", at(12))  # a worker took step 0
    with store.claim_due(at(20), 10) as claim:
        assert [r.steps[0].started for r in claim.records] == [True, False, False]
        assert [r.steps[0].began_at for r in claim.records] == [at(12), None, None]
        assert not any(s.started for r in claim.records for s in r.steps[1:])
        first = claim.records[0]
        decision = machine.decide(first.view(TIMEOUTS), machine.Tick(), at(20))
        assert decision.accepted
        claim.commit(first, decision, [], at(20))
    loaded = store.load(ids[0])
    # watched until its own time is up: 30 s after the worker began it
    assert loaded is not None and loaded.version == 2 and loaded.due_at == at(42)


def test_an_error_inside_a_claim_undoes_its_commits(backend: Backend) -> None:
    store = backend.store
    saga_id = create(store, timeout=30).record.saga_id
    before, rows = store.load(saga_id), backend.rows()
    with pytest.raises(RuntimeError), store.claim_due(at(15), 10) as claim:
        record = claim.records[0]
        decision = machine.decide(record.view(TIMEOUTS), machine.Tick(), at(15))
        claim.commit(record, decision, step_message(saga_id, decision), at(15))
        raise RuntimeError("the scanner crashed mid-claim")
    assert store.load(saga_id) == before
    assert backend.rows() == rows


def test_two_scanners_never_act_on_one_saga_twice(backend: Backend) -> None:
    store = backend.store
    ids = {create(store, key=f"due-{i}", timeout=30).record.saga_id for i in range(6)}
    acted: list[str] = []

    def scan(who: str) -> str:
        with store.claim_due(at(15), 10) as claim:
            time.sleep(0.2)  # hold the claim while the other scanner tries
            for record in claim.records:
                decision = machine.decide(record.view(TIMEOUTS), machine.Tick(), at(15))
                claim.commit(record, decision, [], at(15))  # re-send: next due at 25
                acted.append(record.saga_id)
        return who

    in_two_threads(scan)
    assert sorted(acted) == sorted(ids)


def test_claim_waiting_admits_into_free_slots_oldest_first(backend: Backend) -> None:
    store = backend.store
    create(store, key="running", saga_id="running", now=at(0))
    for i in (1, 2, 3):
        create(store, key=f"w{i}", saga_id=f"w{i}", now=at(i), admit=False)
    create(store, key="o1", saga_id="o1", name="other", now=at(4), admit=False)
    assert set(store.waiting_names()) == {"toy", "other"}

    with store.claim_waiting("toy", 2) as claim:  # 1 running: 1 free slot
        assert [r.saga_id for r in claim.records] == ["w1"]
        record = claim.records[0]
        claim.commit(record, machine.decide(record.view(), machine.Admit(), at(5)), [], at(5))
    admitted = store.load("w1")
    assert admitted is not None and admitted.admitted
    assert admitted.steps[0].status == StepStatus.RUNNING
    with store.claim_waiting("toy", 2) as claim:
        assert claim.records == ()
    with store.claim_waiting("toy", 10) as claim:
        assert [r.saga_id for r in claim.records] == ["w2", "w3"]


def test_a_waiting_saga_that_failed_does_not_hold_up_the_next(backend: Backend) -> None:
    store = backend.store
    dead = create(store, key="dead", saga_id="dead", now=at(1), admit=False, deadline_at=at(5))
    create(store, key="next", saga_id="next", now=at(2), admit=False)
    failed, _ = advance(store, dead.record, machine.Tick(), at(6))  # its deadline passed
    assert failed.state == SagaState.FAILED and not failed.admitted
    with store.claim_waiting("toy", 1) as claim:
        assert [r.saga_id for r in claim.records] == ["next"]


def test_report_stuck_reports_each_unfinished_saga_once(backend: Backend) -> None:
    store = backend.store
    create(store, key="stuck", saga_id="stuck", now=at(1))
    finished = create(store, key="done", saga_id="done", now=at(2)).record
    advance(store, finished, StepFailed(0, 1, "no", True), at(3))
    create(store, key="young", saga_id="young", now=at(100))
    reported = store.report_stuck(at(50), at(200), 10)
    assert [(r.saga_id, r.state) for r in reported] == [("stuck", SagaState.STARTED)]
    assert store.report_stuck(at(50), at(201), 10) == ()
    assert [r.saga_id for r in store.report_stuck(at(150), at(202), 10)] == ["young"]


# --------------------------------------------------------------------------- dead letters

REFUND_DOWN = "ConnectionError: refund API down"


def compensating_charge(
    store: SagaStore, payload: Mapping[str, Any] | None = None, key: str = "order-1"
) -> SagaRecord:
    """A saga compensating step 1 (charge, token 3) after it failed unexpectedly at at(2)."""
    record = create(store, key=key, payload=payload).record
    record, _ = advance(store, record, StepSucceeded(0, 1, "r"), at(1))
    record, _ = advance(store, record, StepFailed(1, 2, "timeout", False, attempts=4), at(2))
    assert (record.state, record.current_step, record.token) == ("COMPENSATING", 1, 3)
    return record


def die(
    store: SagaStore,
    record: SagaRecord,
    now: datetime,
    error: str = REFUND_DOWN,
    attempts: int | None = 3,
    **filled: Any,
) -> tuple[SagaRecord, tuple[OutboxMessage, ...]]:
    """The compensation of the current step failed for good: commit the machine's decision
    with its dead-letter change filled in by ``filled`` (what ``Coordinator.complete`` adds)."""
    event = machine.CompensationFailed(
        record.current_step, record.token, error, attempts, f"Traceback: {error}"
    )
    decision = machine.decide(record.view(), event, now)
    assert decision.accepted and decision.dead_letter is not None
    decision = replace(decision, dead_letter=replace(decision.dead_letter, **filled))
    written = store.commit(record, decision, step_message(record.saga_id, decision), now)
    loaded = store.load(record.saga_id)
    assert loaded is not None
    return loaded, written


def only_entry(store: SagaStore) -> DeadLetterRecord:
    (entry,) = store.dead_letters()
    return entry


def test_a_dead_compensation_creates_one_dead_letter_entry(backend: Backend) -> None:
    store = backend.store
    payload = {"id": "order-1", "payment": {"card_number": "4111111111111111"}}
    record = compensating_charge(store, payload)
    event = machine.CompensationFailed(1, 3, REFUND_DOWN, 3, "Traceback: boom")
    decision = machine.decide(record.view(), event, at(3))
    assert decision.dead_letter == DeadLetterChange(1, "dead", REFUND_DOWN, "Traceback: boom", 3)
    assert decision.commands == (SendToDeadLetterQueue(1),)
    decision = Coordinator(store, registry([Toy().saga()])).complete(record, decision)
    in_paris = at(63).astimezone(timezone(timedelta(hours=2)))
    assert decision.dead_letter is not None
    decision = replace(
        decision, dead_letter=replace(decision.dead_letter, next_auto_retry_at=in_paris)
    )
    written = store.commit(record, decision, step_message(record.saga_id, decision), at(3))
    assert [m.body for m in written] == [{"kind": "dead_letter", "step": 1}]

    entry = only_entry(store)
    assert entry == DeadLetterRecord(
        id=1,
        saga_id=record.saga_id,
        saga_name="toy",
        step=1,
        step_name="charge",
        task_name="toy.undo_charge",
        status="dead",
        attempts=3,
        deaths=1,
        error=REFUND_DOWN,
        traceback="Traceback: boom",
        payload={"id": "order-1", "payment": {"card_number": "***"}},  # redacted
        created_at=at(3),
        updated_at=at(3),
        resolved_at=None,
        resolution=None,
        auto_retries=0,
        next_auto_retry_at=at(63),
    )
    assert utc_offset_is_zero(entry.created_at) and utc_offset_is_zero(entry.updated_at)
    assert utc_offset_is_zero(entry.next_auto_retry_at)
    assert store.dead_letter(1) == entry
    assert store.dead_letter_for(record.saga_id, 1) == entry
    assert store.dead_letter_for(record.saga_id, 0) is None
    assert store.dead_letter_for("nope", 1) is None
    assert store.dead_letter(2) is None
    saga = store.load(record.saga_id)
    assert saga is not None and saga.state == SagaState.COMPENSATION_FAILED
    assert {t.actor for t in store.transitions(record.saga_id)} == {"coordinator"}
    assert backend.rows()["saga_dead_letter"] == 1


def test_a_dead_letter_not_filled_in_gets_the_default_task_name_and_payload(
    backend: Backend,
) -> None:
    store = backend.store
    record = compensating_charge(store)
    die(store, record, at(3), attempts=None)
    entry = only_entry(store)
    assert (entry.task_name, entry.payload, entry.attempts) == ("toy.charge", {}, 0)
    assert entry.next_auto_retry_at is None


def test_an_operator_retry_then_success_resolves_the_entry(backend: Backend) -> None:
    store = backend.store
    record, _ = die(store, compensating_charge(store), at(3), task_name="toy.refund")

    retry = machine.OperatorRetry(1, "alice", "refund API is back")
    record, written = advance(store, record, retry, at(10))
    assert [m.body for m in written] == [{"step": 1, "token": 4}]  # the compensation again
    assert record.state == SagaState.COMPENSATING
    assert record.steps[1].status == StepStatus.COMPENSATING
    retrying = only_entry(store)
    assert (retrying.status, retrying.deaths, retrying.attempts) == ("retrying", 1, 3)
    assert retrying.resolution == "retry by alice: refund API is back"
    assert (retrying.created_at, retrying.updated_at, retrying.resolved_at) == (at(3), at(10), None)
    assert store.dead_letters(status="open") == (retrying,)
    said = "retry by alice: refund API is back"
    assert [
        (t.step, t.old, t.new, t.reason, t.actor, t.at) for t in store.transitions(record.saga_id)
    ][-2:] == [
        (None, "COMPENSATION_FAILED", "COMPENSATING", said, "alice", at(10)),
        ("charge", "compensation_failed", "compensating", said, "alice", at(10)),
    ]

    record, _ = advance(store, record, machine.CompensationSucceeded(1, 4, attempts=4), at(20))
    assert record.steps[1].status == StepStatus.COMPENSATED
    assert record.steps[1].compensation_attempts == 4
    resolved = only_entry(store)
    assert (resolved.status, resolved.resolution) == ("resolved", "compensated")
    assert (resolved.updated_at, resolved.resolved_at) == (at(20), at(20))
    assert utc_offset_is_zero(resolved.resolved_at)
    assert (resolved.deaths, resolved.task_name, resolved.error) == (1, "toy.refund", REFUND_DOWN)
    assert store.dead_letters(status="open") == ()
    assert store.dead_letters(status="resolved") == (resolved,)
    assert store.transitions(record.saga_id)[-1].actor == "coordinator"  # the reply's


def test_a_second_death_of_the_same_step_makes_the_entry_dead_again(backend: Backend) -> None:
    store = backend.store
    first_payload = {"id": "order-1"}
    record, _ = die(
        store,
        compensating_charge(store),
        at(3),
        task_name="toy.refund",
        payload=first_payload,
        next_auto_retry_at=at(60),
    )
    assert store.claim_auto_retry(only_entry(store), at(3600))
    record, _ = advance(store, record, machine.OperatorRetry(1, "bob"), at(10))
    record, written = die(
        store, record, at(20), error="RuntimeError: still down", attempts=5, payload={"x": 1}
    )
    assert record.state == SagaState.COMPENSATION_FAILED
    assert [m.body for m in written] == [{"kind": "dead_letter", "step": 1}]

    again = only_entry(store)
    assert again.id == 1 and backend.rows()["saga_dead_letter"] == 1
    assert (again.status, again.deaths, again.attempts) == ("dead", 2, 5)
    assert (again.error, again.traceback) == (
        "RuntimeError: still down",
        "Traceback: RuntimeError: still down",
    )
    assert (again.created_at, again.updated_at, again.resolved_at) == (at(3), at(20), None)
    assert again.next_auto_retry_at is None  # replaced by the (unfilled) change
    # kept from the first death, and the count of automatic retries goes on
    assert (again.task_name, again.payload) == ("toy.refund", first_payload)
    assert again.resolution == "retry by bob"
    assert again.auto_retries == 1


def test_an_operator_discard_closes_the_entry(backend: Backend) -> None:
    store = backend.store
    record, _ = die(store, compensating_charge(store), at(3))
    discard = machine.OperatorDiscard(1, "carol", "refunded by hand in the PSP console")
    record, written = advance(store, record, discard, at(10))
    assert [m.body for m in written] == [{"step": 0, "token": 4}]  # on to reserve
    said = "compensated manually by carol: refunded by hand in the PSP console"
    entry = only_entry(store)
    assert (entry.status, entry.resolution) == ("discarded", said)
    assert (entry.updated_at, entry.resolved_at, entry.deaths) == (at(10), at(10), 1)
    assert store.dead_letters(status="open") == ()
    assert store.dead_letters(status="discarded") == (entry,)
    assert {t.actor for t in store.transitions(record.saga_id) if t.at == at(10)} == {"carol"}


def change_only(store: SagaStore, saga_id: str, change: DeadLetterChange, now: datetime) -> None:
    """Commit a decision that changes nothing but the dead-letter entry."""
    record = store.load(saga_id)
    assert record is not None
    decision = Decision(True, record.state, record.current_step, record.token, dead_letter=change)
    store.commit(record, decision, [], now)


def test_a_change_from_the_wrong_status_changes_nothing(backend: Backend) -> None:
    store = backend.store
    record, _ = die(store, compensating_charge(store), at(3))
    saga_id, dead = record.saga_id, only_entry(store)
    # "resolved" applies only to a retrying entry: on a dead one it is silently nothing
    change_only(store, saga_id, DeadLetterChange(1, "resolved", resolution="done"), at(4))
    assert only_entry(store) == dead
    # a change for a step without an entry creates none
    for status in ("retrying", "resolved", "discarded"):
        change_only(store, saga_id, DeadLetterChange(0, status, resolution="x"), at(5))
    assert store.dead_letters() == (dead,)

    change_only(store, saga_id, DeadLetterChange(1, "retrying", resolution="by hand"), at(6))
    retrying = only_entry(store)
    assert (retrying.status, retrying.resolution, retrying.updated_at) == (
        "retrying",
        "by hand",
        at(6),
    )
    for status in ("retrying", "discarded"):  # only from dead
        change_only(store, saga_id, DeadLetterChange(1, status, resolution="late"), at(7))
        assert only_entry(store) == retrying

    change_only(store, saga_id, DeadLetterChange(1, "resolved"), at(8))
    resolved = only_entry(store)
    assert (resolved.status, resolved.resolved_at) == ("resolved", at(8))
    assert resolved.resolution == "by hand"  # no new text: kept
    for status in ("retrying", "discarded", "resolved"):
        change_only(store, saga_id, DeadLetterChange(1, status, resolution="late"), at(9))
        assert only_entry(store) == resolved


def test_a_death_reopens_any_entry_and_clears_resolved_at(backend: Backend) -> None:
    store = backend.store
    record, _ = die(store, compensating_charge(store), at(3), payload={"kept": True})
    saga_id = record.saga_id
    change_only(store, saga_id, DeadLetterChange(1, "discarded", resolution="by hand"), at(4))
    assert only_entry(store).resolved_at == at(4)
    change_only(store, saga_id, DeadLetterChange(1, "dead", "again", None, 7), at(5))
    reopened = only_entry(store)
    assert (reopened.id, reopened.status, reopened.deaths) == (1, "dead", 2)
    assert (reopened.error, reopened.traceback, reopened.attempts) == ("again", None, 7)
    assert (reopened.created_at, reopened.updated_at, reopened.resolved_at) == (at(3), at(5), None)
    assert (reopened.payload, reopened.resolution) == ({"kept": True}, "by hand")


def test_dead_letters_oldest_first_filtered_by_saga_and_status(backend: Backend) -> None:
    store = backend.store
    first, _ = die(store, compensating_charge(store), at(3))
    second = create(store, key="order-2", saga_id="second", now=at(4)).record
    second, _ = advance(store, second, StepSucceeded(0, 1, "r"), at(5))
    second, _ = advance(store, second, StepFailed(1, 2, "x", False), at(6))
    second, _ = die(store, second, at(7))
    third = create(store, key="order-3", saga_id="third", now=at(8)).record
    third, _ = advance(store, third, StepFailed(0, 1, "x", False), at(9))
    third, _ = die(store, third, at(10))
    advance(store, second, machine.OperatorRetry(1, "alice"), at(11))
    advance(store, third, machine.OperatorDiscard(0, "bob", "by hand"), at(12))

    def listed(**query: Any) -> list[tuple[str, int, str]]:
        return [(e.saga_id, e.step, e.status) for e in store.dead_letters(**query)]

    assert listed() == [
        (first.saga_id, 1, "dead"),
        ("second", 1, "retrying"),
        ("third", 0, "discarded"),
    ]
    assert [e.id for e in store.dead_letters()] == [1, 2, 3]
    assert listed(status="all") == listed()
    assert listed(status="open") == [(first.saga_id, 1, "dead"), ("second", 1, "retrying")]
    assert listed(status="dead") == [(first.saga_id, 1, "dead")]
    assert listed(status="discarded") == [("third", 0, "discarded")]
    assert listed(status="resolved") == []
    assert listed(status="no such status") == []
    assert listed(saga_id="second") == [("second", 1, "retrying")]
    assert listed(saga_id="third", status="open") == []
    assert listed(limit=2) == listed()[:2]
    assert listed(status="open", limit=1) == [(first.saga_id, 1, "dead")]


def test_claim_auto_retry_is_a_compare_and_set(backend: Backend) -> None:
    store = backend.store
    record, _ = die(store, compensating_charge(store), at(3))
    seen = only_entry(store)
    in_paris = at(3600).astimezone(timezone(timedelta(hours=2)))
    assert store.claim_auto_retry(seen, in_paris) is True
    assert store.claim_auto_retry(seen, at(7200)) is False  # the same snapshot: lost
    claimed = only_entry(store)
    assert (claimed.auto_retries, claimed.next_auto_retry_at) == (1, at(3600))
    assert utc_offset_is_zero(claimed.next_auto_retry_at)
    assert (claimed.status, claimed.updated_at) == ("dead", at(3))
    assert store.claim_auto_retry(claimed, at(7200)) is True
    assert only_entry(store).auto_retries == 2

    advance(store, record, machine.OperatorRetry(1, "alice"), at(10))
    retrying = only_entry(store)
    assert store.claim_auto_retry(retrying, at(9000)) is False  # only a dead entry
    assert only_entry(store) == retrying
    missing = replace(retrying, id=99, status="dead")
    assert store.claim_auto_retry(missing, at(9000)) is False


def test_two_recovery_workers_claiming_one_retry_exactly_one_wins(backend: Backend) -> None:
    store = backend.store
    for round_ in range(RACE_ROUNDS):
        record, _ = die(store, compensating_charge(store, key=f"race-{round_}"), at(3))
        entry = store.dead_letter_for(record.saga_id, 1)
        assert entry is not None

        def claim(who: str, entry: DeadLetterRecord = entry) -> str:
            return who if store.claim_auto_retry(entry, at(60)) else "lost"

        winner, loser = in_two_threads(claim)
        assert loser == "lost" and winner in ("a", "b")
        claimed = store.dead_letter(entry.id)
        assert claimed is not None and claimed.auto_retries == 1


def test_a_stale_commit_writes_no_dead_letter(backend: Backend) -> None:
    store = backend.store
    stale = compensating_charge(store)
    die(store, stale, at(3))
    rows = backend.rows()
    decision = machine.decide(stale.view(), machine.CompensationFailed(1, 3, "late", 9), at(4))
    with pytest.raises(ConcurrentUpdateError):
        store.commit(stale, decision, step_message(stale.saga_id, decision), at(4))
    assert backend.rows() == rows
    assert only_entry(store).attempts == 3


def test_an_error_inside_a_claim_undoes_its_dead_letter(backend: Backend) -> None:
    store = backend.store
    record = create(store, timeout=30).record
    record, _ = advance(store, record, StepFailed(0, 1, "x", False), at(1), TIMEOUTS)
    assert record.state == SagaState.COMPENSATING and record.due_at is not None
    rows = backend.rows()
    with pytest.raises(RuntimeError), store.claim_due(at(100), 10) as claim:
        (claimed,) = claim.records
        event = machine.CompensationFailed(0, claimed.token, REFUND_DOWN, 3)
        decision = machine.decide(claimed.view(TIMEOUTS), event, at(100))
        claim.commit(claimed, decision, step_message(claimed.saga_id, decision), at(100))
        raise RuntimeError("the scanner crashed mid-claim")
    assert backend.rows() == rows
    assert store.dead_letters() == ()


def test_record_attempt_and_attempts_by_attempt_number(backend: Backend) -> None:
    store = backend.store
    saga_id = create(store).record.saga_id
    key = f"{saga_id}:charge:compensation"
    in_paris = at(2).astimezone(timezone(timedelta(hours=2)))
    store.record_attempt(saga_id, key, 2, "second", in_paris)
    store.record_attempt(saga_id, key, 1, "first", at(1))
    store.record_attempt(saga_id, key, 2, "second, redelivered", at(3))
    store.record_attempt(saga_id, f"{saga_id}:charge:action", 1, "other key", at(4))
    attempts = store.attempts(key)
    assert [(a.saga_id, a.key) for a in attempts] == [(saga_id, key)] * 3
    assert [(a.attempt, a.error, a.at) for a in attempts] == [
        (1, "first", at(1)),
        (2, "second", at(2)),
        (2, "second, redelivered", at(3)),
    ]
    assert all(utc_offset_is_zero(a.at) for a in attempts)
    assert [a.error for a in store.attempts(f"{saga_id}:charge:action")] == ["other key"]
    assert store.attempts("nope") == ()
    assert backend.rows()["saga_attempt"] == 4


def test_an_attempt_of_an_unknown_saga_is_refused(backend: Backend) -> None:
    rows = backend.rows()
    # SagaError in memory; SqlSagaStore lets the foreign key's IntegrityError through
    with pytest.raises((SagaError, sa.exc.IntegrityError)):
        backend.store.record_attempt("nope", "nope:charge:action", 1, "boom", at(1))
    assert backend.rows() == rows


# --------------------------------------------------------------------------- whole sagas


class Toy:
    """Four participants that journal their calls; ``decline_at`` raises a business error."""

    def __init__(self, decline_at: int | None = None) -> None:
        self.decline_at = decline_at
        self.journal: list[str] = []

    def saga(self, max_concurrent: int | None = None) -> Saga:
        def action(index: int) -> Callable[[StepContext], Any]:
            def act(ctx: StepContext) -> Any:
                self.journal.append(f"do {ctx.step}")
                if index == self.decline_at:
                    raise BusinessError(f"{ctx.step} declined")
                return {"done": ctx.step, "after": sorted(ctx.results)}

            return act

        def compensation(index: int) -> Callable[[StepContext], Any]:
            def undo(ctx: StepContext) -> None:
                assert ctx.result == {"done": ctx.step, "after": sorted(STEP_NAMES[:index])}
                self.journal.append(f"undo {ctx.step}")

            undo.__name__ = f"undo_{STEP_NAMES[index]}"
            return undo

        steps = [Step(n, action(i), compensation(i)) for i, n in enumerate(STEP_NAMES)]
        return Saga("toy", steps, business_key="order_id", max_concurrent=max_concurrent)


def drive(backend: Backend, toy: Toy) -> SagaRecord:
    coordinator = Coordinator(backend.store, registry([toy.saga()]))
    dispatcher = RecordingDispatcher()
    started = coordinator.start("toy", {"order_id": "A-1", "total": 2800})
    outbox.publish(backend.store, dispatcher, started.messages, coordinator.clock)
    return run_until_settled(coordinator, backend.store, dispatcher, started.saga_id)


def test_a_whole_saga_completes(backend: Backend) -> None:
    toy = Toy()
    final = drive(backend, toy)
    assert final.state == SagaState.COMPLETED
    assert toy.journal == [f"do {n}" for n in STEP_NAMES]
    assert [s.status for s in final.steps] == [StepStatus.COMPLETED] * 4
    assert final.version == 5  # created at 1, one commit per step reply
    assert backend.store.unsent(datetime.now(UTC) + timedelta(days=2), 10) == ()
    assert backend.rows()["saga_guard"] == 4


def test_a_business_failure_at_the_third_step_compensates_in_reverse(backend: Backend) -> None:
    toy = Toy(decline_at=2)
    final = drive(backend, toy)
    assert final.state == SagaState.FAILED
    assert toy.journal == [
        "do reserve",
        "do charge",
        "do ship",
        "undo charge",
        "undo reserve",
    ]
    assert [s.status for s in final.steps] == [
        StepStatus.COMPENSATED,
        StepStatus.COMPENSATED,
        StepStatus.FAILED,
        StepStatus.SKIPPED,
    ]
    assert final.steps[2].error_kind == ErrorKind.BUSINESS
    assert final.reason == "ship failed: BusinessError: [business] ship declined"
    saga_states = [t.new for t in backend.store.transitions(final.saga_id) if t.step is None]
    assert saga_states == ["STARTED", "PENDING", "COMPENSATING", "FAILED"]


def test_sagas_beyond_max_concurrent_wait_and_are_admitted_in_order(backend: Backend) -> None:
    toy = Toy()
    coordinator = Coordinator(backend.store, registry([toy.saga(max_concurrent=1)]))
    dispatcher = RecordingDispatcher()
    first, second = (coordinator.start("toy", {"order_id": key}) for key in ("A-1", "A-2"))
    assert len(first.messages) == 1 and second.messages == ()  # the second one waits
    waiting = backend.store.load(second.saga_id)
    assert waiting is not None and not waiting.admitted
    outbox.publish(backend.store, dispatcher, first.messages, coordinator.clock)

    done = run_until_settled(coordinator, backend.store, dispatcher, first.saga_id)
    assert done.state == SagaState.COMPLETED
    # The last reply of the first saga admitted the second and published its step 0.
    after = run_until_settled(coordinator, backend.store, dispatcher, second.saga_id)
    assert after.state == SagaState.COMPLETED and after.admitted
    assert toy.journal == [f"do {n}" for n in STEP_NAMES] * 2


def test_a_dead_compensation_retried_by_an_operator_through_the_driver(backend: Backend) -> None:
    refunds: list[int] = []

    def refund(ctx: StepContext) -> str:
        refunds.append(ctx.attempt)
        if len(refunds) <= 2:  # dead after its 2 attempts; the operator's retry works
            raise ConnectionError("refund API down")
        return "refunded"

    def ship(ctx: StepContext) -> None:
        raise BusinessError("no stock")

    saga = Saga(
        "shop",
        [
            Step("charge", lambda ctx: 1, refund, compensation_retry=RetryPolicy(max_retries=1)),
            Step("ship", ship, lambda ctx: None, compensation_name="unship"),
        ],
    )
    store = backend.store
    coordinator = Coordinator(store, registry([saga]))
    dispatcher = RecordingDispatcher()
    started = coordinator.start("shop", {"id": "o-1", "card_number": "4111"})
    outbox.publish(store, dispatcher, started.messages, coordinator.clock)
    dead = run_until_settled(coordinator, store, dispatcher, started.saga_id)
    assert dead.state == SagaState.COMPENSATION_FAILED
    (entry,) = store.dead_letters(status="open")
    assert (entry.task_name, entry.attempts, entry.status) == ("shop.refund", 2, "dead")
    assert entry.payload == {"id": "o-1", "card_number": "***"}
    assert entry.error == "ConnectionError: refund API down"
    key = f"{started.saga_id}:charge:compensation"
    assert [a.attempt for a in store.attempts(key)] == [1, 2]
    assert dispatcher.sent[-1].body["kind"] == "dead_letter"

    retried = dlq.retry(coordinator, entry.id, "alice")
    outbox.publish(store, dispatcher, retried.messages, coordinator.clock)
    final = run_until_settled(coordinator, store, dispatcher, started.saga_id)
    assert final.state == SagaState.FAILED
    assert refunds == [1, 2, 3]
    resolved = store.dead_letter(entry.id)
    assert resolved is not None and resolved.status == "resolved"
    assert {t.actor for t in store.transitions(final.saga_id)} == {"coordinator", "alice"}
    assert backend.rows()["saga_dead_letter"] == 1 and backend.rows()["saga_attempt"] == 2


# --------------------------------------------------------------------------- PostgreSQL only


def test_prepared_statements_survive_a_session_that_lost_them(contract_pg_url: str) -> None:
    """The hot path's statements are PREPAREd once per connection; a session that lost
    them (a pooler's DISCARD ALL, DEALLOCATE ALL) gets them prepared again, and nothing is
    written twice or lost."""
    with shared_engine(contract_pg_url).begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    store = SqlSagaStore(contract_pg_url)
    first = create(store, saga_id="p1").record
    second = create(store, "order-2", saga_id="p2").record
    assert store.begin_step("p1:0", "p1", at(1), EXPECTED) == (None, first)
    with store._autocommit.connect() as conn:  # the pool's one idle connection
        names = conn.execute(sa.text("SELECT count(*) FROM pg_prepared_statements")).scalar_one()
        assert names >= 2  # create and begin_step were prepared on it
        conn.exec_driver_sql("DEALLOCATE ALL")
    assert store.begin_step("p2:0", "p2", at(2), EXPECTED) == (None, second)

    def succeed(record: SagaRecord) -> tuple[Decision, list[OutboxMessage]]:
        decision = machine.decide(record.view(), StepSucceeded(0, 1, "r"), at(3))
        return decision, keyed_message(record.saga_id, decision)

    for saga_id in ("p1", "p2"):
        _, decision, written = update(store, saga_id, succeed, at(3))
        assert decision is not None and decision.accepted and len(written) == 1
        loaded = store.load(saga_id)
        assert loaded is not None and (loaded.version, loaded.current_step) == (2, 1)
    with shared_engine(contract_pg_url).connect() as conn:
        transitions_written = conn.execute(sa.text("SELECT count(*) FROM saga_transition"))
        assert transitions_written.scalar_one() == 2 * (2 + 3)  # created + one step, each


def test_engine_options_reach_the_autocommit_connections_too(contract_pg_url: str) -> None:
    """The hot path's autocommit pool is built with the store's engine options (SSL,
    search_path, application_name…), not from the bare URL."""
    with shared_engine(contract_pg_url).begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    url = f"{contract_pg_url}?connect_timeout=9"  # an engine of its own (engines are per URL)
    name = f"sagas-options-{os.getpid()}"
    store = SqlSagaStore(url, connect_args={"application_name": name})
    record = create(store, saga_id="o").record  # one statement, on the autocommit pool
    assert store.begin_step("o:0", "o", at(1), EXPECTED) == (None, record)
    with shared_engine(contract_pg_url).connect() as conn:
        names = conn.execute(
            sa.text(
                "SELECT application_name FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalars()
        # create and begin_step ran on the autocommit pool only: its connection has it
        assert name in set(names)


@pytest.mark.parametrize("prepare", [True, False], ids=["prepared", "unprepared"])
def test_psycopg3_prepares_the_hot_path_itself_unless_told_not_to(
    contract_pg_url: str, prepare: bool
) -> None:
    """psycopg 3: no hand-made PREPARE (``cs_…``); the driver prepares a statement run
    ``prepare_threshold`` times (5) itself, and nothing at all with ``prepare=False``
    (a pooler in transaction mode)."""
    with shared_engine(contract_pg_url).begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    url = on_psycopg3(contract_pg_url, application_name=f"auto-prepare-{prepare}")
    store = SqlSagaStore(url, prepare=prepare)
    for n in range(8):
        record = create(store, f"order-{n}", saga_id=f"a{n}").record
        assert store.begin_step(f"a{n}:0", f"a{n}", at(1), EXPECTED) == (None, record)
    with store._autocommit.connect() as conn:  # the pool's one idle connection
        names = set(conn.execute(sa.text("SELECT name FROM pg_prepared_statements")).scalars())
    assert not {name for name in names if name.startswith("cs_")}
    assert bool(names) is prepare


def test_psycopg3_unprepared_store_prepares_nothing_after_a_prepared_one(
    contract_pg_url: str,
) -> None:
    """``prepare=False`` holds whichever component made the URL's engines first (a
    prepared store of the same process, e.g. the choreography's): its engines are its own."""
    with shared_engine(contract_pg_url).begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    url = on_psycopg3(contract_pg_url, application_name="prepared-first")
    SqlSagaStore(url)  # prepare=True: the driver's default prepare_threshold
    store = SqlSagaStore(url, prepare=False)
    for n in range(8):
        record = create(store, f"order-{n}", saga_id=f"p{n}").record
        assert store.begin_step(f"p{n}:0", f"p{n}", at(1), EXPECTED) == (None, record)
    for engine in (store._autocommit, store.engine):
        with engine.connect() as conn:
            assert conn.connection.driver_connection.prepare_threshold is None
            prepared = conn.execute(sa.text("SELECT name FROM pg_prepared_statements")).all()
            assert prepared == []


@pytest.mark.parametrize("prepare", [True, False])
def test_psycopg3_choreography_and_service_outbox_honour_prepare(
    contract_pg_url: str, prepare: bool
) -> None:
    """The choreography's store and a service outbox follow ``prepared_statements`` too:
    with ``prepare=False`` their psycopg 3 connections prepare nothing, whatever engine of
    the URL the process made first."""
    url = on_psycopg3(contract_pg_url, application_name=f"choreo-prepare-{prepare}")
    SqlSagaStore(url)  # the URL's default engine exists first
    for component in (ChoreographyStore(url, prepare=prepare), ServiceOutbox(url, prepare)):
        with component.engine.connect() as conn:
            threshold = conn.connection.driver_connection.prepare_threshold
            assert (threshold is None) is not prepare
