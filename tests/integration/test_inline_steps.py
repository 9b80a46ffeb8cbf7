"""``inline_steps``: a saga's next step runs in the delivery of the step before it. Real
prefork workers on Redis and PostgreSQL; the participants' own tables are the ground truth.

Each step still goes through its check, its ``started`` marker and its own transaction, so
what the default mode guarantees must hold here too, with fewer messages: every saga settles
once, a pool child SIGKILLed in the middle of an inline step (at every step index, forward
and compensating) leaves no saga stuck and no side effect doubled, and a message delivered
twice still acts once.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from typing import Any

import pytest

from celery_sagas.store import SqlSagaStore
from tests.integration.conftest import Deployment, make_order, rows_for, wait_settled
from tests.support.processes import CeleryProcess, active_task_pid, wait_until
from workers import db

STEPS = ("reserve_inventory", "process_payment", "create_shipment", "send_confirmation")
FIRST = "inline_orders.reserve_inventory"
APP = "tests.integration.inline_app"


@pytest.fixture(scope="module")
def start_inline(deployment: Deployment) -> Any:
    from tests.integration.inline_app import start_inline

    return start_inline


def inline_worker(deployment: Deployment, duplicates: bool = False, **kwargs: Any) -> Any:
    env = {**deployment.env, "INLINE_APP_DUPLICATES": "1" if duplicates else "0"}
    return deployment.worker(APP, env=env, quick_exit=True, **kwargs)


def received(log: str, step: str) -> int:
    """How many messages of ``step``'s task the worker received (deliveries)."""
    return len(re.findall(rf"inline_orders\.{step}\[[0-9a-f-]+\] received", log))


def completions(store: SqlSagaStore, saga_id: str, new: str = "completed") -> list[str]:
    return [t.step for t in store.transitions(saga_id) if t.new == new]


def assert_completed_once(store: SqlSagaStore, order: dict[str, Any], record: Any) -> None:
    assert record.state.value == "COMPLETED", record
    assert completions(store, record.saga_id) == list(STEPS)
    assert len(rows_for(db.reservations, order["order_id"])) == 1
    assert [p.status for p in rows_for(db.payments, order["order_id"])] == ["captured"]
    assert len(rows_for(db.shipments, order["order_id"])) == 1
    assert len(rows_for(db.notifications, order["order_id"])) == 1


@pytest.mark.parametrize(("pool", "concurrency"), [("prefork", 2), ("threads", 8), ("gevent", 50)])
def test_sagas_complete_and_compensate_in_one_delivery_each(
    pool: str,
    concurrency: int,
    deployment: Deployment,
    start_inline: Any,
    fresh_sku: Callable[[int], str],
) -> None:
    """Good orders complete and an order declined at each later step index is compensated
    in reverse; all of it runs inside the first step's delivery (one message per saga),
    under each pool (an inline run's request is its thread's or greenlet's own)."""
    sku = fresh_sku(20)
    good = [make_order(sku, qty=1) for _ in range(3)]
    declined = {
        index: make_order(sku, qty=1, simulate={STEPS[index]: "fail"}) for index in (1, 2, 3)
    }
    orders = [*good, *declined.values()]
    store = SqlSagaStore(db.database_url())
    name = f"inline-{pool}"
    with inline_worker(deployment, name=name, pool=pool, concurrency=concurrency) as worker:
        for order in orders:
            start_inline.delay(order)
        records = wait_settled([o["order_id"] for o in orders])
        log = worker.log_text()

    for order in good:
        assert_completed_once(store, order, records[order["order_id"]])
    for index, order in declined.items():
        record = records[order["order_id"]]
        assert record.state.value == "FAILED", record
        # the steps before the declined one, undone in strict reverse order
        assert completions(store, record.saga_id, "compensated") == list(STEPS[:index][::-1])
    assert db.stock(sku) == 20 - len(good)
    # one delivery per saga: the first step's; every later step and compensation ran inline
    assert received(log, "reserve_inventory") == len(orders)
    for step in STEPS[1:]:
        assert received(log, step) == 0, step
    assert received(log, "release_inventory") == 0


def _kill_while_running(
    worker: CeleryProcess, hostname: str, store: SqlSagaStore, order: dict[str, Any], key: str
) -> None:
    """SIGKILL the pool child once ``key``'s step runs inline (its marker is written)."""
    from tests.integration.inline_app import app

    saga = wait_until(lambda: store.find(order["order_id"]), timeout=30, message="saga")
    guard_key = f"{saga.saga_id}:{key}"
    wait_until(lambda: store.get_guard(guard_key), timeout=30, message=f"{key} began")
    pid = wait_until(
        lambda: active_task_pid(app, hostname, FIRST), timeout=30, message="the delivery's child"
    )
    os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("index", [1, 2, 3])
def test_a_child_killed_in_an_inline_step_leaves_no_saga_stuck(
    index: int, deployment: Deployment, start_inline: Any, fresh_sku: Callable[[int], str]
) -> None:
    """The step runs inline and its pool child is SIGKILLed: the first step's message comes
    back, finds the step begun by its own delivery, and has it sent again; the saga
    completes and every participant acted once."""
    sku = fresh_sku(5)
    order = make_order(sku, qty=1, simulate={STEPS[index]: "slow:2"})
    store = SqlSagaStore(db.database_url())
    hostname = f"inline-kill-{index}-{os.getpid()}@localhost"
    with inline_worker(deployment, name="inline-kill", hostname=hostname, concurrency=1) as w:
        start_inline.delay(order)
        _kill_while_running(w, hostname, store, order, f"{STEPS[index]}:action")
        record = wait_settled([order["order_id"]], timeout=60)[order["order_id"]]
        log = w.log_text()

    assert "SIGKILL" in log or "signal 9" in log
    assert_completed_once(store, order, record)
    transitions = store.transitions(record.saga_id)
    resent = [t for t in transitions if "died before it finished" in (t.reason or "")]
    assert [t.step for t in resent] == [STEPS[index]]
    assert db.stock(sku) == 4


@pytest.mark.parametrize("index", [0, 1])
def test_a_child_killed_in_an_inline_compensation_leaves_no_saga_stuck(
    index: int, deployment: Deployment, start_inline: Any, fresh_sku: Callable[[int], str]
) -> None:
    """create_shipment declines; the compensation of step ``index`` runs inline and its
    pool child is SIGKILLed: it is sent again, and the saga ends FAILED with each
    compensation done once, in reverse order."""
    compensation = ("release_inventory", "refund_payment")[index]
    sku = fresh_sku(5)
    order = make_order(sku, qty=1, simulate={"create_shipment": "fail", compensation: "slow:2"})
    store = SqlSagaStore(db.database_url())
    hostname = f"inline-undo-{index}-{os.getpid()}@localhost"
    with inline_worker(deployment, name="inline-undo", hostname=hostname, concurrency=1) as w:
        start_inline.delay(order)
        _kill_while_running(w, hostname, store, order, f"{STEPS[index]}:compensation")
        record = wait_settled([order["order_id"]], timeout=60)[order["order_id"]]

    assert record.state.value == "FAILED", record
    transitions = store.transitions(record.saga_id)
    resent = [t for t in transitions if "died before it finished" in (t.reason or "")]
    assert [t.step for t in resent] == [STEPS[index]]
    assert completions(store, record.saga_id, "compensated") == [
        "process_payment",
        "reserve_inventory",
    ]
    assert [p.status for p in rows_for(db.payments, order["order_id"])] == ["refunded"]
    assert rows_for(db.shipments, order["order_id"]) == []
    assert db.stock(sku) == 5  # reserved once, released once


def test_every_message_delivered_twice_acts_once_inline(
    deployment: Deployment, start_inline: Any, fresh_sku: Callable[[int], str]
) -> None:
    """Every message published twice, byte for byte (same task id): a duplicate of the
    first step's message may find a later step begun by its own task id and have it sent
    again; participants still act once per saga."""
    from tests.integration import duplicating_app

    sku = fresh_sku(10)
    good = [make_order(sku, qty=1) for _ in range(3)]
    failing = make_order(sku, qty=1, simulate={"send_confirmation": "fail"})
    orders = [*good, failing]
    store = SqlSagaStore(db.database_url())
    duplicating_app.enable()
    try:
        with inline_worker(deployment, duplicates=True, name="inline-dup"):
            for order in orders:
                start_inline.delay(order)
            records = wait_settled([o["order_id"] for o in orders])
    finally:
        duplicating_app.disable()

    for order in good:
        assert_completed_once(store, order, records[order["order_id"]])
    failed = records[failing["order_id"]]
    assert failed.state.value == "FAILED"
    assert completions(store, failed.saga_id, "compensated") == list(STEPS[:3][::-1])
    assert [p.status for p in rows_for(db.payments, failing["order_id"])] == ["refunded"]
    assert db.stock(sku) == 10 - len(good)


def test_a_retry_in_an_inline_run_is_published_and_the_saga_goes_on(
    deployment: Deployment, start_inline: Any, fresh_sku: Callable[[int], str]
) -> None:
    """A participant that fails with retries left, inline: its retry is a message of its
    own (Celery's retry), which ends the inline run; the retried step then carries the
    saga on in its delivery. Forward and compensating."""
    sku = fresh_sku(10)
    flaky = make_order(sku, qty=1, simulate={"process_payment": "transient:1"})
    undo = make_order(
        sku, qty=1, simulate={"create_shipment": "fail", "refund_payment": "transient:1"}
    )
    store = SqlSagaStore(db.database_url())
    with inline_worker(deployment, name="inline-retry") as worker:
        start_inline.delay(flaky)
        start_inline.delay(undo)
        records = wait_settled([flaky["order_id"], undo["order_id"]], timeout=60)
        log = worker.log_text()

    record = records[flaky["order_id"]]
    assert_completed_once(store, flaky, record)
    assert record.steps[1].attempts == 2  # the transient failure, then the retry
    failed = records[undo["order_id"]]
    assert failed.state.value == "FAILED", failed
    assert completions(store, failed.saga_id, "compensated") == list(STEPS[:2][::-1])
    assert failed.steps[1].compensation_attempts == 2
    assert [p.status for p in rows_for(db.payments, undo["order_id"])] == ["refunded"]
    # only the retries were published: one message each for the payment and the refund
    assert received(log, "process_payment") == 1
    assert received(log, "refund_payment") == 1
    assert received(log, "create_shipment") == 0
