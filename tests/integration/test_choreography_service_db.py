"""A service whose database is not the saga database (PostgreSQL, two databases): its
work, guard and outbox commit together in its own database; the saga's timeline goes to
the saga database in a transaction of its own. Handlers run in this process
(``task.apply``), so each case reads exactly what one delivery did."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery

from celery_sagas import BusinessError, Choreography, RetryPolicy, choreography_subscriber
from celery_sagas.choreography import OutgoingEvent, start_event_id
from celery_sagas.coordinator import utcnow
from celery_sagas.store import SqlSagaStore, upgrade
from celery_sagas.store.service_outbox import (
    create_service_tables,
    service_guards,
    service_outbox,
)
from celery_sagas.store.tables import events, reactions
from tests.conftest import require_service
from tests.support.databases import create_pg_database, drop_pg_database

pytestmark = pytest.mark.integration

ledger_metadata = sa.MetaData()
ledger = sa.Table(
    "ledger",
    ledger_metadata,
    sa.Column("saga_id", sa.Text, primary_key=True),
    sa.Column("note", sa.Text, nullable=False),
)


class Declined(BusinessError):
    code = "declined"


FLOW = Choreography(
    "booking_flow",
    start="Opened",
    events={"Booked"},
    compensating={"Refused"},
    succeeded="Closed",
    failed="Aborted",
    retry=RetryPolicy(max_retries=2, backoff_base=0.01, backoff_cap=0.01),
)


def book(event: Any, tx: Any) -> None:
    tx.execute(ledger.insert().values(saga_id=event.saga_id, note=event.data["mode"]))
    event.publish("Booked", {"mode": event.data["mode"]})
    if event.data["mode"] == "crash":
        raise RuntimeError("the ledger service crashed after publishing")
    if event.data["mode"] == "decline":
        raise Declined("no room in the ledger")


@pytest.fixture(scope="module")
def databases() -> Iterator[tuple[str, str]]:
    require_service("postgresql")
    saga_url, service_url = create_pg_database("choreo_saga"), create_pg_database("choreo_svc")
    upgrade(saga_url)
    create_service_tables(service_url)
    ledger_metadata.create_all(sa.create_engine(service_url, poolclass=sa.pool.NullPool))
    yield saga_url, service_url
    drop_pg_database(saga_url)
    drop_pg_database(service_url)


@pytest.fixture
def flow(databases: tuple[str, str], redis_url: str) -> Any:
    saga_url, service_url = databases
    app = Celery(f"svc-{uuid.uuid4().hex[:6]}", broker=redis_url)
    on = choreography_subscriber(
        app, FLOW, database_url=saga_url, service_databases={"ledger": service_url}
    )
    on("Opened", service="ledger", on_business_error="Refused")(book)
    return on


def counts(url: str, saga_id: str, *tables: sa.Table) -> dict[str, int]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        return {
            t.name: conn.execute(
                sa.select(sa.func.count()).select_from(t).where(t.c.saga_id == saga_id)
            ).scalar_one()
            for t in tables
        }


def deliver(on: Any, saga_id: str) -> Any:
    task = on.app.tasks["booking_flow.ledger.book"]
    data = {"mode": on.saga_store.load(saga_id).payload["mode"]}
    kwargs = {"saga_id": saga_id, "event": "Opened", "event_id": start_event_id(saga_id)}
    return task.apply(kwargs={**kwargs, "data": data}).get(propagate=False)


def test_work_guard_and_outbox_in_the_service_database_timeline_in_the_saga_database(
    flow: Any, databases: tuple[str, str]
) -> None:
    saga_url, service_url = databases
    saga_id = flow.start({"mode": "ok"})
    assert deliver(flow, saga_id) == "ok"
    service = (ledger, service_guards, service_outbox)
    assert counts(service_url, saga_id, *service) == {
        "ledger": 1,
        "choreography_guard": 1,
        "choreography_outbox": 1,
    }
    assert counts(saga_url, saga_id, events, reactions) == {"saga_event": 2, "saga_reaction": 1}
    assert flow.saga_store.load(saga_id).state.value == "PENDING"
    assert flow.service_outbox("ledger").unsent(flow.clock(), 10) == ()  # marked sent

    assert deliver(flow, saga_id) == "duplicate"  # changes nothing anywhere
    assert counts(service_url, saga_id, *service) == {
        "ledger": 1,
        "choreography_guard": 1,
        "choreography_outbox": 1,
    }
    assert counts(saga_url, saga_id, events, reactions) == {"saga_event": 2, "saga_reaction": 1}


def test_a_rolled_back_handler_leaves_nothing_and_is_dead_lettered(
    flow: Any, databases: tuple[str, str]
) -> None:
    saga_url, service_url = databases
    saga_id = flow.start({"mode": "crash"})
    assert deliver(flow, saga_id) == "dead"  # eager retries: 3 attempts, then the DLQ
    assert counts(service_url, saga_id, ledger, service_guards, service_outbox) == {
        "ledger": 0,
        "choreography_guard": 0,
        "choreography_outbox": 0,
    }
    assert counts(saga_url, saga_id, events, reactions) == {"saga_event": 1, "saga_reaction": 0}
    (entry,) = SqlSagaStore(saga_url).dead_letters(saga_id)
    assert (entry.step_name, entry.status, entry.attempts) == ("ledger.book", "dead", 3)
    assert "crashed after publishing" in (entry.error or "")
    assert len(SqlSagaStore(saga_url).attempts(entry.payload["attempts_key"])) == 3


def test_a_business_error_commits_the_guard_and_the_failure_event_only(
    flow: Any, databases: tuple[str, str]
) -> None:
    _, service_url = databases
    saga_id = flow.start({"mode": "decline"})
    assert deliver(flow, saga_id) == "business"
    assert counts(service_url, saga_id, ledger, service_guards, service_outbox) == {
        "ledger": 0,  # the work rolled back
        "choreography_guard": 1,
        "choreography_outbox": 1,  # Refused, not Booked
    }
    timeline, _ = flow.store.timeline(saga_id)
    assert [e.name for e in timeline] == ["Opened", "Refused"]
    assert "Declined: [declined] no room in the ledger" in timeline[-1].data["reason"]
    assert flow.saga_store.load(saga_id).state.value == "COMPENSATING"


def test_the_relay_records_the_reaction_of_a_handler_that_died_before_the_timeline(
    flow: Any, databases: tuple[str, str]
) -> None:
    """The service committed its work, guard and outbox row; its worker died before the
    saga database's transaction. The relay records the event it left and the reaction
    its guard holds, so the timeline says which handler consumed what."""
    saga_url, _ = databases
    saga_id = flow.start({"mode": "ok"})
    opened = start_event_id(saga_id)
    booked = OutgoingEvent(
        str(uuid.uuid4()), saga_id, "Booked", "ledger", {"mode": "ok"}, "ledger.book", opened
    )
    flow.service_outbox("ledger").react(
        saga_id, "ledger.book", opened, lambda tx: [booked], None, (), flow.clock()
    )
    assert counts(saga_url, saga_id, events, reactions) == {"saga_event": 1, "saga_reaction": 0}

    flow.clock = lambda: utcnow() + timedelta(minutes=1)  # past relay_after
    try:
        flow.relay()
    finally:
        flow.clock = utcnow
    assert counts(saga_url, saga_id, events, reactions) == {"saga_event": 2, "saga_reaction": 1}
    _, reacted = flow.store.timeline(saga_id)
    assert reacted == {(opened, "ledger.book")}
    assert deliver(flow, saga_id) == "duplicate"  # and a late duplicate adds nothing
    assert counts(saga_url, saga_id, events, reactions) == {"saga_event": 2, "saga_reaction": 1}
