"""Every event of the order choreography delivered twice (to two prefork children at
once): each handler acts once, the timeline records each event and reaction once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.choreography_support import (
    SERVICES,
    choreo_order,
    reactions,
    statuses,
    stock_of,
    timeline,
    wait_state,
)
from tests.integration.conftest import Deployment
from tests.support.processes import CeleryProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def worker(deployment: Deployment) -> Iterator[CeleryProcess]:
    from workers import choreography

    choreography.create_tables()
    queues = [*SERVICES, "celery", "sagas.control"]
    with deployment.worker(
        "tests.support.choreo_twice_app", queues=queues, quick_exit=True
    ) as process:
        yield process


@pytest.fixture
def twice(worker: CeleryProcess) -> Iterator[Any]:
    """The example's subscriber in this process, delivering twice while the test runs."""
    from tests.support.choreo_twice_app import deliver_twice
    from workers.app import order_choreography

    deliver_twice(order_choreography)
    yield order_choreography
    del order_choreography.deliver  # the class's own again


def test_every_event_delivered_twice_is_handled_once(
    twice: Any, worker: CeleryProcess, fresh_sku: Callable[[int], str]
) -> None:
    from workers.choreography import start_order

    sku = fresh_sku(10)
    happy, declined = (
        choreo_order(sku, qty=2),
        choreo_order(sku, payment={"method": "card_declined"}),
    )
    ids = [start_order(twice, happy), start_order(twice, declined)]
    assert [wait_state(i).state.value for i in ids] == ["COMPLETED", "FAILED"]
    assert [n for n, _ in timeline(ids[0])] == [
        "OrderCreated",
        "InventoryReserved",
        "PaymentProcessed",
        "ShipmentCreated",
        "OrderFulfilled",
    ]
    assert [n for n, _ in timeline(ids[1])] == [
        "OrderCreated",
        "InventoryReserved",
        "PaymentFailed",
        "InventoryReleased",
        "OrderFailed",
    ]
    assert len(reactions(ids[0])) == 4 and len(reactions(ids[1])) == 4
    assert statuses(happy["order_id"]) == {
        "reservations": ["reserved"],
        "payments": ["captured"],
        "shipments": ["created"],
        "choreo_orders": ["fulfilled"],
    }
    assert statuses(declined["order_id"])["payments"] == []
    assert statuses(declined["order_id"])["reservations"] == ["released"]
    assert stock_of(sku) == 8
    # each of the 8 reactions saw its second delivery, and found its guard
    assert worker.log_text().count("succeeded in") >= 16
    assert worker.log_text().count("'duplicate'") == 8
