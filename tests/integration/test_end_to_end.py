"""The order saga end to end: real prefork workers, PostgreSQL and Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import func, select

from celery_sagas import InvalidPayloadError, PayloadConflictError, install
from celery_sagas.store import SqlSagaStore
from celery_sagas.store.tables import guards, outbox, sagas
from tests.integration.conftest import (
    Deployment,
    make_order,
    rows_for,
    wait_settled,
)
from tests.support.processes import CeleryProcess
from workers import db
from workers.sagas import order_fulfillment

STEPS = ["reserve_inventory", "process_payment", "create_shipment", "send_confirmation"]
COMPENSATIONS = [
    "release_inventory",
    "refund_payment",
    "cancel_shipment",
    "send_cancellation_notice",
]
RESULT_ID = ["reservation_id", "payment_id", "shipment_id", "notification_id"]


@pytest.fixture(scope="module", params=["inline", "coordinator_hop"])
def worker(deployment: Deployment, request: pytest.FixtureRequest) -> Iterator[CeleryProcess]:
    """Every test here runs twice: step tasks applying their own outcome (the default, one
    hop per step) and the chain ``step | celery_sagas.advance`` (``coordinator_hop``)."""
    hop = "true" if request.param == "coordinator_hop" else "false"
    env = {**deployment.env, "SAGAS_COORDINATOR_HOP": hop, "SAGAS_SIGNING_KEY": "e2e-key"}
    with deployment.worker(name=f"e2e-{request.param}", env=env, quick_exit=True) as process:
        process.mode = request.param  # type: ignore[attr-defined]
        yield process


@pytest.fixture
def start_saga(worker: CeleryProcess, deployment: Deployment) -> Any:
    """The caller's start, in the workers' mode: with ``coordinator_hop`` the caller
    publishes the first step itself, so it signs it with the same key and carries its
    data, like the workers."""
    from workers.orders import start_saga as default_start

    if worker.mode != "coordinator_hop":  # type: ignore[attr-defined]
        return default_start
    app = Celery("e2e-caller", broker=deployment.broker_url)
    runtime = install(
        app,
        [order_fulfillment],
        database_url=deployment.database_url,
        coordinator_hop=True,
        signing_key="e2e-key",
    )
    return runtime.start_task("order_fulfillment")


def test_happy_path_completes_with_one_side_effect_of_each_kind(
    worker: CeleryProcess, start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    sku = fresh_sku(10)
    order = make_order(sku, qty=3)
    start_saga.delay(order)
    record = wait_settled([order["order_id"]])[order["order_id"]]
    # the outcome reached the saga through the coordinator task only in that mode
    advanced = "Task celery_sagas.advance[" in worker.log_text()
    assert advanced == (worker.mode == "coordinator_hop")  # type: ignore[attr-defined]
    assert record.state.value == "COMPLETED"
    assert [s.status.value for s in record.steps] == ["completed"] * 4
    assert db.stock(sku) == 7
    assert [r.status for r in rows_for(db.reservations, order["order_id"])] == ["reserved"]
    assert [r.status for r in rows_for(db.payments, order["order_id"])] == ["captured"]
    assert [r.status for r in rows_for(db.shipments, order["order_id"])] == ["created"]
    assert [r.kind for r in rows_for(db.notifications, order["order_id"])] == ["confirmation"]
    assert record.steps[1].result["amount"] == 3 * 1250


def _compensation_results(saga_id: str) -> dict[str, Any]:
    with db.get_engine().connect() as conn:
        rows = conn.execute(
            select(guards.c.key, guards.c.result).where(
                guards.c.key.like(f"{saga_id}:%:compensation")
            )
        )
        return {key.split(":")[1]: result for key, result in rows}


@pytest.mark.parametrize("failing", range(4), ids=STEPS)
def test_failure_at_each_step_compensates_completed_steps_in_reverse(
    worker: CeleryProcess, start_saga: Any, fresh_sku: Callable[[int], str], failing: int
) -> None:
    sku = fresh_sku(10)
    order = make_order(sku, qty=2, simulate={STEPS[failing]: "fail"})
    start_saga.delay(order)
    record = wait_settled([order["order_id"]])[order["order_id"]]
    store = SqlSagaStore(db.database_url())

    assert record.state.value == "FAILED"
    assert STEPS[failing] in record.reason
    statuses = [s.status.value for s in record.steps]
    assert statuses == ["compensated"] * failing + ["failed"] + ["skipped"] * (3 - failing)
    compensated_order = [
        t.step for t in store.transitions(record.saga_id) if t.new == "compensated"
    ]
    assert compensated_order == [STEPS[i] for i in reversed(range(failing))]
    # each compensation received the original result of its step
    undone = _compensation_results(record.saga_id)
    assert set(undone) == set(STEPS[:failing])  # nothing for the failed step itself
    for index in range(failing):
        original_id = record.steps[index].result[RESULT_ID[index]]
        assert undone[STEPS[index]]["undone"] == original_id
    assert db.stock(sku) == 10
    assert all(p.status == "refunded" for p in rows_for(db.payments, order["order_id"]))
    assert all(s.status == "cancelled" for s in rows_for(db.shipments, order["order_id"]))


def test_business_failures_happen_naturally(
    worker: CeleryProcess, start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    scarce = fresh_sku(1)
    no_stock = make_order(scarce, qty=2)
    declined = make_order(fresh_sku(5), qty=1, payment={"method": "card_declined"})
    for order in (no_stock, declined):
        start_saga.delay(order)
    records = wait_settled([no_stock["order_id"], declined["order_id"]])
    assert records[no_stock["order_id"]].state.value == "FAILED"
    assert "InsufficientInventory" in records[no_stock["order_id"]].reason
    assert db.stock(scarce) == 1
    assert records[declined["order_id"]].state.value == "FAILED"
    assert "PaymentDeclined" in records[declined["order_id"]].reason
    assert [s.status.value for s in records[declined["order_id"]].steps[:2]] == [
        "compensated",
        "failed",
    ]


def test_transient_errors_are_retried_and_counted(
    worker: CeleryProcess, start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    order = make_order(fresh_sku(5), simulate={"process_payment": "transient:2"})
    start_saga.delay(order)
    record = wait_settled([order["order_id"]])[order["order_id"]]
    assert record.state.value == "COMPLETED"
    assert record.steps[1].attempts == 3
    assert len(rows_for(db.payments, order["order_id"])) == 1


def _saga_count(key: str) -> int:
    with db.get_engine().connect() as conn:
        return conn.execute(
            select(func.count()).select_from(sagas).where(sagas.c.business_key == key)
        ).scalar_one()


def test_same_order_twice_is_one_saga_and_another_payload_is_refused(
    worker: CeleryProcess, start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    order = make_order(fresh_sku(5))
    start_saga.delay(order)
    start_saga.delay(order)
    wait_settled([order["order_id"]])
    assert start_saga(order)["created"] is False
    assert _saga_count(order["order_id"]) == 1
    with db.get_engine().connect() as conn:
        outbox_before = conn.execute(select(func.count()).select_from(outbox)).scalar_one()
    changed = {**order, "items": [{**order["items"][0], "qty": 2}]}
    with pytest.raises(PayloadConflictError, match="different payload"):
        start_saga(changed)
    record = saga_by_key_payload(order["order_id"])
    assert record == order
    with db.get_engine().connect() as conn:
        assert conn.execute(select(func.count()).select_from(outbox)).scalar_one() == outbox_before


def saga_by_key_payload(key: str) -> Any:
    with db.get_engine().connect() as conn:
        return conn.execute(select(sagas.c.payload).where(sagas.c.business_key == key)).scalar_one()


@pytest.mark.parametrize(
    ("order", "message"),
    [
        (
            {"items": [{"sku": "X", "qty": 1, "price": 1}], "payment": {"method": "card"}},
            "order_id",
        ),
        ({"order_id": "BAD-1", "items": [], "payment": {"method": "card"}}, "items"),
        (
            {
                "order_id": "BAD-2",
                "items": [{"sku": "X", "qty": 1, "price": 1}],
                "payment": {"method": "card"},
                "when": object(),
            },
            "JSON",
        ),
        ("not an order", "order"),
    ],
    ids=["missing-order-id", "empty-items", "not-json", "not-a-dict"],
)
def test_invalid_orders_are_refused_in_the_caller_and_nothing_is_written(
    start_saga: Any, order: Any, message: str
) -> None:
    with db.get_engine().connect() as conn:
        before = conn.execute(select(func.count()).select_from(sagas)).scalar_one()
    with pytest.raises(InvalidPayloadError, match=message):
        start_saga.delay(order)
    with pytest.raises(InvalidPayloadError, match=message):
        start_saga(order)
    with db.get_engine().connect() as conn:
        assert conn.execute(select(func.count()).select_from(sagas)).scalar_one() == before
