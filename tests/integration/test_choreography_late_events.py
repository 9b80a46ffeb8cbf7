"""A forward event of the order choreography that arrives after the deadline compensated
the order (its service was away, the event waited in its queue) must not act: the order
failed, so nothing may stay charged or reserved. Handlers run in this process
(``task.apply``) on the example's tables, in the order the late delivery gives them; their
messages go to a throwaway Redis database that no worker reads."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from celery import Celery

from celery_sagas.store import upgrade
from tests.integration.choreography_support import choreo_order, statuses, stock_of
from tests.integration.conftest import Deployment
from tests.support.databases import create_pg_database, drop_pg_database

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def saga_url(deployment: Deployment) -> Iterator[str]:
    """A saga database of these tests' own (the participants' tables stay in the
    session's): the deadline scan sees only their sagas."""
    url = create_pg_database("choreo_late")
    upgrade(url)
    yield url
    drop_pg_database(url)


@pytest.fixture
def on(saga_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    from workers import choreography, db

    choreography.create_tables()
    monkeypatch.setenv("PARTICIPANTS_DATABASE_URL", db.database_url())  # the session's
    monkeypatch.setenv("SAGAS_DATABASE_URL", saga_url)
    monkeypatch.setenv("CELERY_BROKER_URL", redis_url)  # Celery prefers it to broker=
    return choreography.register(Celery(f"late-{uuid.uuid4().hex[:6]}", broker=redis_url))


def handle(on: Any, saga_id: str, event: str, service: str, handler: str) -> str:
    """Deliver the saga's last ``event`` to ``service.handler``, in this process."""
    events, _ = on.store.timeline(saga_id)
    found = [e for e in events if e.name == event][-1]
    task = on.app.tasks[on.choreography.handler_task_name(service, handler)]
    kwargs = {"saga_id": saga_id, "event": event, "event_id": found.event_id}
    return str(task.apply(kwargs={**kwargs, "data": dict(found.data)}).get())


def time_out(on: Any, saga_id: str) -> None:
    """Beat's scan (the saga's deadline of 1 ms has passed), then the timeout's
    compensation handlers."""
    assert on.scan() >= 1
    handle(on, saga_id, "OrderTimedOut", "payment", "refund_on_timeout")
    handle(on, saga_id, "OrderTimedOut", "shipping", "cancel_shipment")
    handle(on, saga_id, "PaymentRefunded", "inventory", "release_after_refund")
    handle(on, saga_id, "InventoryReleased", "order", "fail")
    assert on.saga_store.load(saga_id).state.value == "FAILED"


def test_a_late_charge_charges_nothing_for_a_timed_out_order(
    on: Any, fresh_sku: Callable[[int], str]
) -> None:
    from workers.choreography import start_order

    sku = fresh_sku(10)
    order = choreo_order(sku)
    saga_id = start_order(on, order, timedelta(milliseconds=1))
    assert handle(on, saga_id, "OrderCreated", "inventory", "reserve") == "ok"
    time_out(on, saga_id)  # payment was away: InventoryReserved still in its queue

    assert handle(on, saga_id, "InventoryReserved", "payment", "charge") == "ok"
    found = statuses(order["order_id"])
    assert "captured" not in found["payments"]
    assert found["reservations"] == ["released"]
    assert stock_of(sku) == 10


def test_a_late_reservation_reserves_nothing_for_a_timed_out_order(
    on: Any, fresh_sku: Callable[[int], str]
) -> None:
    from workers.choreography import start_order

    sku = fresh_sku(10)
    order = choreo_order(sku)
    saga_id = start_order(on, order, timedelta(milliseconds=1))
    time_out(on, saga_id)  # inventory was away: OrderCreated still in its queue

    assert handle(on, saga_id, "OrderCreated", "inventory", "reserve") == "ok"
    assert "reserved" not in statuses(order["order_id"])["reservations"]
    assert stock_of(sku) == 10
