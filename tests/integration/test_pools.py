"""The order saga on real ``celery worker -P threads`` and ``-P gevent`` processes.

Under both pools many steps run at once in one process, sharing the store's engines, its
connection pool and the prepared statements; under gevent psycopg2 must wait greenly
(``celery_sagas.integration.green``). Ground truth is read from the participants' tables.

Neither pool enforces Celery's soft time limit, and threads not the hard one either: a
step's timeout is then enforced by the saga's own deadline, which the beat's scan acts on
(gevent's hard limit, a ``gevent.Timeout``, records it first when it fires).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from celery_sagas.store import SqlSagaStore
from tests.integration.conftest import Deployment, make_order, rows_for, wait_settled
from tests.support.processes import CeleryProcess, Pool
from workers import db

CONCURRENCY: dict[Pool, int] = {"threads": 8, "gevent": 50}
SHIPMENT_TIMEOUT = 1.5
GRACE = 1.0
STEPS = ["reserve_inventory", "process_payment", "create_shipment", "send_confirmation"]


def pool_env(deployment: Deployment) -> dict[str, str]:
    return {
        **deployment.env,
        "SAGAS_SCAN_INTERVAL": "0.5",
        "SAGAS_STEP_TIMEOUTS": json.dumps({"order_fulfillment.create_shipment": SHIPMENT_TIMEOUT}),
        "SAGAS_TIME_LIMIT_GRACE": str(GRACE),
        # a silent started step is timed out at once, not re-sent first: under threads it
        # is not dead (Celery did not stop it), only late
        "SAGAS_MAX_REDISPATCHES": "0",
    }


@pytest.fixture(scope="module")
def beat(deployment: Deployment) -> Iterator[CeleryProcess]:
    """The scan every 0.5 s: the backstop of step deadlines under threads and gevent."""
    process = CeleryProcess(
        "workers.app",
        kind="beat",
        log_dir=deployment.log_dir / "pools-beat",
        env=pool_env(deployment),
        name="pools-beat",
    )
    with process:
        yield process


@pytest.fixture(scope="module", params=list(CONCURRENCY))
def pool(request: pytest.FixtureRequest) -> Pool:
    value: Pool = request.param
    return value


@pytest.fixture(scope="module")
def worker(deployment: Deployment, beat: CeleryProcess, pool: Pool) -> Iterator[CeleryProcess]:
    with deployment.worker(
        name=f"pools-{pool}",
        pool=pool,
        concurrency=CONCURRENCY[pool],
        env=pool_env(deployment),
        quick_exit=True,
    ) as process:
        yield process


def _transitions(saga_id: str, new: str) -> list[str]:
    store = SqlSagaStore(db.database_url())
    return [t.step for t in store.transitions(saga_id) if t.new == new]


def test_concurrent_sagas_complete_with_one_side_effect_each(
    worker: CeleryProcess, pool: Pool, start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    sku = fresh_sku(100)
    orders = [make_order(sku, qty=2) for _ in range(12)]
    for order in orders:
        start_saga.delay(order)
    records = wait_settled([o["order_id"] for o in orders], timeout=60)
    for order in orders:
        record = records[order["order_id"]]
        assert record.state.value == "COMPLETED", record.reason
        assert _transitions(record.saga_id, "completed") == STEPS
        assert len(rows_for(db.reservations, order["order_id"])) == 1
        assert [p.status for p in rows_for(db.payments, order["order_id"])] == ["captured"]
        assert [s.status for s in rows_for(db.shipments, order["order_id"])] == ["created"]
        assert len(rows_for(db.notifications, order["order_id"])) == 1
    assert db.stock(sku) == 100 - 2 * len(orders)
    log = worker.log_text()
    assert "Traceback" not in log
    if pool == "gevent":
        assert "celery-sagas: -P gevent: psycopg2 waits greenly" in log
    size = min(CONCURRENCY[pool], 20)
    assert f"engine pools hold {size} connections (+10)" in log
    enforced = "only the hard one" if pool == "gevent" else "none"
    assert f"celery-sagas: -P {pool}: of Celery's time limits of step tasks, {enforced}" in log


def test_a_failure_at_a_middle_step_is_compensated_in_reverse(
    worker: CeleryProcess, start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    sku = fresh_sku(10)
    order = make_order(sku, qty=3, simulate={"create_shipment": "fail"})
    start_saga.delay(order)
    record = wait_settled([order["order_id"]], timeout=30)[order["order_id"]]
    assert record.state.value == "FAILED"
    assert [s.status.value for s in record.steps] == [
        "compensated",
        "compensated",
        "failed",
        "skipped",
    ]
    assert _transitions(record.saga_id, "compensated") == ["process_payment", "reserve_inventory"]
    assert db.stock(sku) == 10
    assert [p.status for p in rows_for(db.payments, order["order_id"])] == ["refunded"]
    assert rows_for(db.shipments, order["order_id"]) == []
    assert rows_for(db.notifications, order["order_id"]) == []


def test_a_hanging_step_times_out_at_its_deadline_and_its_late_end_changes_nothing(
    worker: CeleryProcess, pool: Pool, start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    """No soft time limit interrupts the hung call: the scan (threads) or gevent's hard
    limit times the step out at timeout + grace, and the saga is compensated."""
    sku = fresh_sku(10)
    hang = SHIPMENT_TIMEOUT + GRACE + 5.0  # room for a late scan on a busy machine
    order = make_order(sku, qty=2, simulate={"create_shipment": "hang"}, hang_seconds=hang)
    start_saga.delay(order)
    record = wait_settled([order["order_id"]], timeout=30)[order["order_id"]]
    shipment = record.steps[2]
    assert record.state.value == "FAILED"
    assert [s.status.value for s in record.steps] == ["compensated"] * 3 + ["skipped"]
    assert shipment.error_kind.value == "timeout"
    waited = (shipment.compensation_started_at - shipment.started_at).total_seconds()
    assert SHIPMENT_TIMEOUT + GRACE <= waited < hang  # its deadline, not the end of the hang
    assert _transitions(record.saga_id, "compensated") == STEPS[2::-1]
    assert db.stock(sku) == 10
    if pool == "threads":  # the scan timed it out; the hung call ends later, acts not
        assert "no reply within" in (shipment.error or "")
        late = f"saga {record.saga_id} create_shipment: ignored StepSucceeded (late"
        worker.wait_for_log(late, timeout=hang + 5)
    else:  # gevent's hard limit (a gevent.Timeout) interrupts the call at the same moment
        # the scan's deadline falls due: on a busy machine either records the timeout first
        reasons = ("hard time limit", "no reply within")
        assert any(reason in (shipment.error or "") for reason in reasons), shipment.error
    assert [s.status for s in rows_for(db.shipments, order["order_id"])] == ["cancelled"]
    assert rows_for(db.notifications, order["order_id"]) == []


def test_every_message_delivered_twice_acts_once(
    deployment: Deployment,
    worker: CeleryProcess,
    pool: Pool,
    start_saga: Any,
    fresh_sku: Callable[[int], str],
) -> None:
    """Duplicates run at the same time as their original, in two threads (greenlets) of
    one process: the step guard lets one of them act. (The module's worker pauses, so the
    duplicating one receives both copies.)"""
    from tests.integration import duplicating_app

    sku = fresh_sku(20)
    good = [make_order(sku, qty=2) for _ in range(3)]
    failing = make_order(sku, qty=2, simulate={"process_payment": "fail"})
    orders = [*good, failing]
    counter = redis.Redis.from_url(deployment.broker_url)
    counter.delete(duplicating_app.DUPLICATES_KEY)
    duplicating = deployment.worker(
        "tests.integration.duplicating_app",
        name=f"pools-dup-{pool}",
        pool=pool,
        concurrency=CONCURRENCY[pool],
    )
    duplicating_app.enable()
    worker.stop()
    try:
        with duplicating:
            for order in orders:
                start_saga.delay(order)
            records = wait_settled([o["order_id"] for o in orders], timeout=60)
    finally:
        duplicating_app.disable()
        worker.start().wait_ready()
    assert int(counter.get(duplicating_app.DUPLICATES_KEY) or 0) >= 4 * 3
    for order in good:
        record = records[order["order_id"]]
        assert record.state.value == "COMPLETED"
        assert _transitions(record.saga_id, "completed") == STEPS
        for table in (db.reservations, db.payments, db.shipments, db.notifications):
            assert len(rows_for(table, order["order_id"])) == 1
    failed = records[failing["order_id"]]
    assert failed.state.value == "FAILED"
    assert _transitions(failed.saga_id, "compensated") == ["reserve_inventory"]
    assert [r.status for r in rows_for(db.reservations, failing["order_id"])] == ["released"]
    assert rows_for(db.payments, failing["order_id"]) == []
    assert db.stock(sku) == 20 - 2 * len(good)
