"""Delivery faults: every message delivered twice, and a pool child SIGKILLed mid-step."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import redis

from celery_sagas.store import SqlSagaStore, dispose_all_after_fork
from tests.integration.conftest import Deployment, make_order, rows_for, wait_settled
from tests.support.processes import active_task_pid, wait_until
from workers import db


def test_every_message_delivered_twice_causes_no_double_side_effect(
    deployment: Deployment, start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    from tests.integration import duplicating_app

    sku = fresh_sku(20)
    good = [make_order(sku, qty=2) for _ in range(3)]
    failing = make_order(sku, qty=2, simulate={"create_shipment": "fail"})
    orders = [*good, failing]
    counter = redis.Redis.from_url(deployment.broker_url)
    counter.delete(duplicating_app.DUPLICATES_KEY)
    duplicating_app.enable()  # the start messages from this process are doubled too
    try:
        with deployment.worker(
            "tests.integration.duplicating_app", name="dup-worker", quick_exit=True
        ) as worker:
            for order in orders:
                start_saga.delay(order)
            records = wait_settled([o["order_id"] for o in orders])
            hook_runs = {  # each saga's outcome hook, sent once the saga settled
                o["order_id"]: wait_until(
                    lambda o=o: rows_for(db.order_outcomes, o["order_id"]), timeout=30
                )
                for o in orders
            }
            log = worker.log_text()
    finally:
        duplicating_app.disable()

    # 4 sagas x (4 step/compensation tasks + the outcome hook) were all doubled
    assert int(counter.get(duplicating_app.DUPLICATES_KEY) or 0) >= 4 * 5
    # a duplicate finds its saga moved on and is refused before it runs anything, or (run
    # beside its original, the two copies taken by the two pool children at once) its
    # outcome is ignored as not the current step's: which one depends on timing
    assert "message ignored (stale" in log or "is not the current step" in log
    # each saga's outcome hook ran once although its message came twice
    for order in orders:
        hook = "on_failed" if order is failing else "on_completed"
        assert [r.hook for r in hook_runs[order["order_id"]]] == [hook]
        assert [r.hook for r in rows_for(db.order_outcomes, order["order_id"])] == [hook]
    store = SqlSagaStore(db.database_url())
    for order in good:
        record = records[order["order_id"]]
        assert record.state.value == "COMPLETED"
        assert len(rows_for(db.reservations, order["order_id"])) == 1
        assert len(rows_for(db.payments, order["order_id"])) == 1
        assert len(rows_for(db.shipments, order["order_id"])) == 1
        assert len(rows_for(db.notifications, order["order_id"])) == 1
        completions = [t.step for t in store.transitions(record.saga_id) if t.new == "completed"]
        assert completions == [
            "reserve_inventory",
            "process_payment",
            "create_shipment",
            "send_confirmation",
        ]
    failed = records[failing["order_id"]]
    assert failed.state.value == "FAILED"
    compensations = [t.step for t in store.transitions(failed.saga_id) if t.new == "compensated"]
    assert compensations == ["process_payment", "reserve_inventory"]
    assert [p.status for p in rows_for(db.payments, failing["order_id"])] == ["refunded"]
    assert db.stock(sku) == 20 - 2 * len(good)


def test_pool_child_sigkilled_mid_step_saga_still_completes_exactly_once(
    deployment: Deployment, start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    from workers.app import app

    sku = fresh_sku(5)
    order = make_order(sku, qty=1, simulate={"process_payment": "slow:2"})
    hostname = f"kill-{os.getpid()}@localhost"
    with deployment.worker(
        name="kill-worker", hostname=hostname, concurrency=1, quick_exit=True
    ) as worker:
        start_saga.delay(order)
        pid = wait_until(
            lambda: active_task_pid(app, hostname, "order_fulfillment.process_payment"),
            timeout=30,
            message="process_payment running in a pool child",
        )
        os.kill(pid, signal.SIGKILL)
        record = wait_settled([order["order_id"]], timeout=60)[order["order_id"]]
        wait_until(lambda: rows_for(db.order_outcomes, order["order_id"]), message="hook ran")
        log = worker.log_text()

    assert "SIGKILL" in log or "signal 9" in log
    assert record.state.value == "COMPLETED"
    assert [p.status for p in rows_for(db.payments, order["order_id"])] == ["captured"]
    assert len(rows_for(db.reservations, order["order_id"])) == 1
    assert db.stock(sku) == 4
    store = SqlSagaStore(db.database_url())
    completions = [t.step for t in store.transitions(record.saga_id) if t.new == "completed"]
    assert completions.count("process_payment") == 1
    assert [r.hook for r in rows_for(db.order_outcomes, order["order_id"])] == ["on_completed"]


HOT_PATH = "AND query LIKE 'EXECUTE cs_%%'"  # the workers' prepared hot-path statements


def _backends_killed(which: str = "") -> int:
    """Terminate the other connections to the database (``which`` narrows them down):
    what a PostgreSQL restart or failover does to the workers' pooled connections."""
    with db.get_engine().connect() as conn:
        killed = conn.exec_driver_sql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            f"WHERE datname = current_database() AND pid <> pg_backend_pid() {which}"
        ).scalar_one()
    return int(killed)


def _payment_with_connections_killed(
    deployment: Deployment, start_saga: Any, sku: str, name: str, which: str
) -> tuple[dict[str, Any], Any, str]:
    """An order whose payment takes 1.5 s; while it runs, the connections ``which``
    names are terminated. Returns the order, its settled saga and the worker's log."""
    order = make_order(sku, qty=1, simulate={"process_payment": "slow:1.5"})
    store = SqlSagaStore(db.database_url())
    with deployment.worker(name=name, concurrency=1, quick_exit=True) as worker:
        start_saga.delay(order)
        saga = wait_until(lambda: store.find(order["order_id"]), timeout=30, message="saga")
        key = f"{saga.saga_id}:process_payment:action"
        wait_until(lambda: store.get_guard(key), timeout=30, message="payment started")
        assert _backends_killed(which) >= 1
        # this process's own pooled connections may be among them: start afresh (a client
        # of the store after a database restart sees one StoreUnavailableError per pool)
        dispose_all_after_fork()
        db.reset_engine()
        record = wait_settled([order["order_id"]], timeout=60)[order["order_id"]]
        return order, record, worker.log_text()


def test_a_connection_lost_before_the_outcome_is_applied_does_not_run_the_step_twice(
    deployment: Deployment, start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    """The database drops the worker's connection while a participant runs: applying the
    outcome fails, the task is retried carrying the outcome, and the participant is not run
    again (its attempt count stays 1)."""
    order, record, log = _payment_with_connections_killed(
        deployment, start_saga, fresh_sku(5), "dropped-connection", HOT_PATH
    )
    store = SqlSagaStore(db.database_url())

    assert "cannot record the outcome of the action" in log
    assert record.state.value == "COMPLETED"
    payment = record.steps[1]
    assert (payment.name, payment.attempts) == ("process_payment", 1)  # ran once
    assert [p.status for p in rows_for(db.payments, order["order_id"])] == ["captured"]
    completions = [t.step for t in store.transitions(record.saga_id) if t.new == "completed"]
    assert completions.count("process_payment") == 1


def test_a_participants_lost_connection_is_retried_not_a_business_failure(
    deployment: Deployment, start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    """The participant's pooled connection dies while it runs (its database restarted):
    its ``OperationalError`` is retried with backoff, and the order completes once."""
    sku = fresh_sku(5)
    order, record, log = _payment_with_connections_killed(
        deployment, start_saga, sku, "participant-reconnect", ""
    )

    assert "OperationalError" in log and "retry in" in log
    assert record.state.value == "COMPLETED"
    assert [p.status for p in rows_for(db.payments, order["order_id"])] == ["captured"]
    assert record.steps[1].attempts >= 2  # the lost connection cost one attempt
    assert db.stock(sku) == 4
