"""The example participants against real databases: SQLite (a tmp file) and PostgreSQL.

Every forward action acts once per idempotency key, every compensation undoes once, the
business errors leave nothing behind, and two workers racing for the last unit cannot
both win.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from celery_sagas.definition import StepContext, idempotency_key
from celery_sagas.errors import TransientError
from workers import db, participants
from workers.participants import (
    InsufficientInventory,
    PaymentDeclined,
    SimulatedFailure,
    cancel_shipment,
    create_shipment,
    process_payment,
    refund_payment,
    release_inventory,
    reserve_inventory,
    send_cancellation_notice,
    send_confirmation,
)

STOCK = {"BOOK": 10, "PEN": 5, "LAST": 1}

ORDER: dict[str, Any] = {
    "order_id": "A-1001",
    "items": [{"sku": "BOOK", "qty": 2, "price": 1250}, {"sku": "PEN", "qty": 1, "price": 300}],
    "payment": {"method": "card"},
    "address": "1 Example Street",
}
ORDER_TOTAL = 2 * 1250 + 300

# (forward action, its compensation, the step name, the table the action writes)
STEPS = [
    (reserve_inventory, release_inventory, "reserve_inventory", db.reservations),
    (process_payment, refund_payment, "process_payment", db.payments),
    (create_shipment, cancel_shipment, "create_shipment", db.shipments),
    (send_confirmation, send_cancellation_notice, "send_confirmation", db.notifications),
]


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh participants' database (tables created, stock seeded) behind get_engine()."""
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_database"
    url: str = request.getfixturevalue(fixture)
    monkeypatch.setenv(db.DATABASE_URL_ENV, url)
    db.reset_engine()
    db.create_tables()
    db.seed_inventory(STOCK)
    yield request.param
    db.reset_engine()


def order(**changes: Any) -> dict[str, Any]:
    return {**copy.deepcopy(ORDER), **changes}


def action_context(
    step: str, payload: dict[str, Any], *, saga_id: str = "S1", attempt: int = 1
) -> StepContext:
    return StepContext(
        saga_id=saga_id,
        saga="order_fulfillment",
        step=step,
        payload=payload,
        results={},
        idempotency_key=idempotency_key(saga_id, step, "action"),
        attempt=attempt,
    )


def compensation_context(
    step: str, payload: dict[str, Any], result: Any, *, saga_id: str = "S1", attempt: int = 1
) -> StepContext:
    return StepContext(
        saga_id=saga_id,
        saga="order_fulfillment",
        step=step,
        payload=payload,
        results={},
        idempotency_key=idempotency_key(saga_id, step, "compensation"),
        attempt=attempt,
        result=result,
    )


def rows(table: sa.Table, **where: Any) -> list[sa.Row[Any]]:
    query = sa.select(table).order_by(table.c.id)
    for column, value in where.items():
        query = query.where(table.c[column] == value)
    with db.get_engine().connect() as connection:
        return list(connection.execute(query).all())


def stock_levels() -> dict[str, int]:
    return {sku: db.stock(sku) for sku in STOCK}


# --- engine and tables ------------------------------------------------------------


def test_without_a_database_url_the_embedded_sqlite_file_is_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(db.DATABASE_URL_ENV, raising=False)
    monkeypatch.setenv("SAGAS_DEMO_DIR", str(tmp_path))
    db.reset_engine()
    try:
        assert db.get_engine().url.database == str(tmp_path / "sagas.db")
    finally:
        db.reset_engine()


def test_tables_are_created_idempotently_and_stock_is_upserted(database: str) -> None:
    db.create_tables()
    db.seed_inventory({"BOOK": 3, "NEW": 7})
    assert db.stock("BOOK") == 3
    assert db.stock("NEW") == 7
    assert db.stock("PEN") == 5
    with pytest.raises(LookupError, match="unknown sku"):
        db.stock("NOPE")
    assert db.get_engine() is db.get_engine()


def test_sqlite_transactions_take_the_write_lock_up_front(database: str) -> None:
    if database != "sqlite":
        pytest.skip("SQLite only")
    with db.get_engine().connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


# --- forward actions are idempotent -----------------------------------------------------


def test_reserving_twice_takes_stock_once(database: str) -> None:
    ctx = action_context("reserve_inventory", order())
    first = reserve_inventory(ctx)
    second = reserve_inventory(ctx)
    assert first == second
    assert first["items"] == [{"sku": "BOOK", "qty": 2}, {"sku": "PEN", "qty": 1}]
    assert stock_levels() == {"BOOK": 8, "PEN": 4, "LAST": 1}
    [reservation] = rows(db.reservations)
    assert (reservation.id, reservation.status, reservation.order_id) == (
        first["reservation_id"],
        "reserved",
        "A-1001",
    )


def test_repeated_sku_lines_are_reserved_together(database: str) -> None:
    items = [{"sku": "PEN", "qty": 3, "price": 1}, {"sku": "PEN", "qty": 3, "price": 1}]
    with pytest.raises(InsufficientInventory, match="PEN: want 6, have 5"):
        reserve_inventory(action_context("reserve_inventory", order(items=items)))
    assert db.stock("PEN") == 5


@pytest.mark.parametrize(
    ("action", "step", "table", "expected"),
    [
        (process_payment, "process_payment", db.payments, {"amount": ORDER_TOTAL}),
        (create_shipment, "create_shipment", db.shipments, {"tracking": "TRK-A-1001"}),
        (send_confirmation, "send_confirmation", db.notifications, {}),
    ],
)
def test_acting_twice_writes_one_row_and_returns_the_same_result(
    database: str,
    action: Callable[[StepContext], dict[str, Any]],
    step: str,
    table: sa.Table,
    expected: dict[str, Any],
) -> None:
    ctx = action_context(step, order())
    first = action(ctx)
    assert action(ctx) == first
    assert expected.items() <= first.items()
    assert len(rows(table)) == 1


def test_payment_captures_the_order_total(database: str) -> None:
    result = process_payment(action_context("process_payment", order()))
    [payment] = rows(db.payments)
    assert (payment.status, payment.amount, payment.method) == ("captured", ORDER_TOTAL, "card")
    assert result == {"payment_id": payment.id, "amount": ORDER_TOTAL}


def test_shipment_and_confirmation_rows(database: str) -> None:
    create_shipment(action_context("create_shipment", order()))
    send_confirmation(action_context("send_confirmation", order()))
    [shipment] = rows(db.shipments)
    [notification] = rows(db.notifications)
    assert (shipment.status, shipment.tracking) == ("created", "TRK-A-1001")
    assert (notification.status, notification.kind) == ("sent", "confirmation")


def test_two_orders_reserve_independently(database: str) -> None:
    reserve_inventory(action_context("reserve_inventory", order(), saga_id="S1"))
    reserve_inventory(action_context("reserve_inventory", order(order_id="B"), saga_id="S2"))
    assert stock_levels() == {"BOOK": 6, "PEN": 3, "LAST": 1}


# --- business errors leave nothing behind ------------------------------------------------


def test_insufficient_stock_raises_and_changes_nothing(database: str) -> None:
    items = [{"sku": "BOOK", "qty": 1, "price": 100}, {"sku": "LAST", "qty": 2, "price": 100}]
    with pytest.raises(InsufficientInventory) as raised:
        reserve_inventory(action_context("reserve_inventory", order(items=items)))
    assert raised.value.code == "insufficient_inventory"
    assert "LAST: want 2, have 1" in raised.value.message
    assert stock_levels() == STOCK
    assert rows(db.reservations) == []


def test_unknown_sku_is_insufficient_inventory(database: str) -> None:
    items = [{"sku": "GHOST", "qty": 1, "price": 100}]
    with pytest.raises(InsufficientInventory, match="GHOST: want 1, have 0"):
        reserve_inventory(action_context("reserve_inventory", order(items=items)))
    assert rows(db.reservations) == []


def test_declined_card_raises_and_writes_no_payment(database: str) -> None:
    declined = order(payment={"method": "card_declined"})
    with pytest.raises(PaymentDeclined) as raised:
        process_payment(action_context("process_payment", declined))
    assert raised.value.code == "payment_declined"
    assert rows(db.payments) == []


# --- compensations undo once -----------------------------------------------------------------


def test_releasing_twice_restores_stock_exactly(database: str) -> None:
    reserved = reserve_inventory(action_context("reserve_inventory", order()))
    ctx = compensation_context("reserve_inventory", order(), reserved)
    first = release_inventory(ctx)
    second = release_inventory(ctx)
    assert first == {"undone": reserved["reservation_id"], "already": False}
    assert second == {"undone": reserved["reservation_id"], "already": True}
    assert stock_levels() == STOCK
    assert [row.status for row in rows(db.reservations)] == ["released"]


@pytest.mark.parametrize(
    ("action", "undo", "step", "table", "undone_status"),
    [
        (process_payment, refund_payment, "process_payment", db.payments, "refunded"),
        (create_shipment, cancel_shipment, "create_shipment", db.shipments, "cancelled"),
    ],
)
def test_compensating_twice_undoes_once(
    database: str,
    action: Callable[[StepContext], dict[str, Any]],
    undo: Callable[[StepContext], dict[str, Any]],
    step: str,
    table: sa.Table,
    undone_status: str,
) -> None:
    result = action(action_context(step, order()))
    original_id = next(iter(result.values()))
    ctx = compensation_context(step, order(), result)
    assert undo(ctx) == {"undone": original_id, "already": False}
    assert undo(ctx) == {"undone": original_id, "already": True}
    [row] = rows(table)
    assert row.status == undone_status
    assert row.updated_at >= row.created_at


def test_cancellation_notice_is_sent_once(database: str) -> None:
    confirmed = send_confirmation(action_context("send_confirmation", order()))
    ctx = compensation_context("send_confirmation", order(), confirmed)
    assert send_cancellation_notice(ctx) == {
        "undone": confirmed["notification_id"],
        "already": False,
    }
    assert send_cancellation_notice(ctx)["already"] is True
    assert [row.kind for row in rows(db.notifications)] == ["confirmation", "cancellation"]


@pytest.mark.parametrize(
    ("undo", "step", "result"),
    [
        (release_inventory, "reserve_inventory", {"reservation_id": 999}),
        (refund_payment, "process_payment", {"payment_id": 999}),
        (cancel_shipment, "create_shipment", {"shipment_id": 999}),
    ],
)
def test_compensating_a_missing_row_is_success(
    database: str,
    undo: Callable[[StepContext], dict[str, Any]],
    step: str,
    result: dict[str, Any],
) -> None:
    assert undo(compensation_context(step, order(), result)) == {"undone": 999, "already": True}
    assert stock_levels() == STOCK


@pytest.mark.parametrize(("action", "undo", "step", "table"), STEPS)
def test_compensating_a_step_without_result_finds_its_row_by_key(
    database: str,
    action: Callable[[StepContext], dict[str, Any]],
    undo: Callable[[StepContext], dict[str, Any]],
    step: str,
    table: sa.Table,
) -> None:
    """A timed-out step has no result: the compensation looks up what its action wrote."""
    action(action_context(step, order()))
    outcome = undo(compensation_context(step, order(), None))
    assert outcome["already"] is False
    assert stock_levels() == STOCK


@pytest.mark.parametrize(("action", "undo", "step", "table"), STEPS[:3])
def test_an_action_arriving_after_its_compensation_does_not_act(
    database: str,
    action: Callable[[StepContext], dict[str, Any]],
    undo: Callable[[StepContext], dict[str, Any]],
    step: str,
    table: sa.Table,
) -> None:
    """Compensating a step whose action never wrote leaves an undone row in its place."""
    assert undo(compensation_context(step, order(), None)) == {"undone": None, "already": True}
    action(action_context(step, order()))
    [row] = rows(table)
    assert row.status in {"released", "refunded", "cancelled"}
    assert stock_levels() == STOCK


@pytest.mark.parametrize(
    ("undo", "step", "result"),
    [
        (release_inventory, "reserve_inventory", {"payment_id": 1}),
        (refund_payment, "process_payment", {}),
        (cancel_shipment, "create_shipment", "TRK-1"),
        (send_cancellation_notice, "send_confirmation", {"shipment_id": 1}),
    ],
)
def test_compensating_with_a_result_that_lacks_the_id_is_an_error(
    database: str,
    undo: Callable[[StepContext], dict[str, Any]],
    step: str,
    result: Any,
) -> None:
    with pytest.raises(ValueError, match=f"cannot compensate step {step} of saga S1"):
        undo(compensation_context(step, order(), result))


# --- simulation -------------------------------------------------------------------------


ALL_FUNCTIONS = [
    pytest.param(function, step, role, id=function.__name__)
    for action, undo, step, _ in STEPS
    for function, role in ((action, "action"), (undo, "compensation"))
]


def run(function: Callable[[StepContext], Any], step: str, role: str, payload: Any, attempt: int):
    if role == "action":
        return function(action_context(step, payload, attempt=attempt))
    return function(compensation_context(step, payload, None, attempt=attempt))


@pytest.mark.parametrize(("function", "step", "role"), ALL_FUNCTIONS)
def test_simulated_transient_failures_end_after_n_attempts(
    database: str, function: Callable[[StepContext], Any], step: str, role: str
) -> None:
    payload = order(simulate={function.__name__: "transient:2"})
    for attempt in (1, 2):
        with pytest.raises(TransientError, match=f"attempt {attempt}"):
            run(function, step, role, payload, attempt)
    assert stock_levels() == STOCK
    assert isinstance(run(function, step, role, payload, 3), dict)


@pytest.mark.parametrize(("function", "step", "role"), ALL_FUNCTIONS)
def test_simulated_failure_acts_not_at_all(
    database: str, function: Callable[[StepContext], Any], step: str, role: str
) -> None:
    payload = order(simulate={function.__name__: "fail"})
    expected: type[Exception] = SimulatedFailure if role == "action" else RuntimeError
    with pytest.raises(expected, match="simulated"):
        run(function, step, role, payload, 1)
    assert all(rows(table) == [] for *_, table in STEPS)
    assert stock_levels() == STOCK


def test_simulated_compensation_failure_leaves_the_reservation(database: str) -> None:
    reserved = reserve_inventory(action_context("reserve_inventory", order()))
    payload = order(simulate={"release_inventory": "fail"})
    with pytest.raises(RuntimeError, match="simulated compensation failure"):
        release_inventory(compensation_context("reserve_inventory", payload, reserved))
    assert [row.status for row in rows(db.reservations)] == ["reserved"]
    assert db.stock("BOOK") == 8


@pytest.mark.parametrize(
    ("simulate", "extra", "slept"),
    [
        ("slow:1.5", {}, 1.5),
        ("hang", {"hang_seconds": 42}, 42.0),
        ("hang", {}, 3600.0),
    ],
)
def test_slow_and_hang_sleep_then_act(
    database: str,
    monkeypatch: pytest.MonkeyPatch,
    simulate: str,
    extra: dict[str, Any],
    slept: float,
) -> None:
    naps: list[float] = []
    monkeypatch.setattr(participants.time, "sleep", naps.append)
    payload = order(simulate={"process_payment": simulate}, **extra)
    result = process_payment(action_context("process_payment", payload))
    assert naps == [slept]
    assert result["amount"] == ORDER_TOTAL


def test_simulation_for_one_function_leaves_the_others_alone(database: str) -> None:
    payload = order(simulate={"release_inventory": "fail"})
    assert reserve_inventory(action_context("reserve_inventory", payload))["items"]


# --- concurrency -------------------------------------------------------------------------


def race(contexts: list[StepContext]) -> list[Any]:
    """Run ``reserve_inventory`` for every context at once; each outcome or exception."""
    barrier = threading.Barrier(len(contexts))
    outcomes: list[Any] = [None] * len(contexts)

    def reserve(index: int, ctx: StepContext) -> None:
        barrier.wait()
        try:
            outcomes[index] = reserve_inventory(ctx)
        except Exception as exc:
            outcomes[index] = exc

    threads = [
        threading.Thread(target=reserve, args=(index, ctx)) for index, ctx in enumerate(contexts)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return outcomes


@pytest.fixture
def slow_stock_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hold each worker between reading the stock and writing it, widening the race window:
    without row locks (or BEGIN IMMEDIATE on SQLite) both workers would see the last unit."""
    read_stock = participants._lock_stock

    def read_stock_slowly(connection: sa.Connection, skus: Any) -> dict[str, int]:
        on_hand = read_stock(connection, skus)
        time.sleep(0.3)
        return on_hand

    monkeypatch.setattr(participants, "_lock_stock", read_stock_slowly)


@pytest.mark.usefixtures("slow_stock_check")
def test_two_workers_racing_for_the_last_unit_one_wins(database: str) -> None:
    items = [{"sku": "LAST", "qty": 1, "price": 100}]
    contexts = [
        action_context("reserve_inventory", order(order_id=f"R-{n}", items=items), saga_id=f"S{n}")
        for n in (1, 2)
    ]
    outcomes = race(contexts)
    won = [outcome for outcome in outcomes if isinstance(outcome, dict)]
    lost = [outcome for outcome in outcomes if isinstance(outcome, InsufficientInventory)]
    assert (len(won), len(lost)) == (1, 1), outcomes
    assert db.stock("LAST") == 0
    assert len(rows(db.reservations)) == 1


def test_a_step_delivered_twice_at_once_acts_once(database: str) -> None:
    ctx = action_context("reserve_inventory", order())
    first, second = race([ctx, ctx])
    assert isinstance(first, dict) and first == second, (first, second)
    assert stock_levels() == {"BOOK": 8, "PEN": 4, "LAST": 1}
