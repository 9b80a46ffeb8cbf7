"""Recovery paths: a crash between commit and publish, admission limits, the stuck alarm."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import func, select

from celery_sagas.store.tables import sagas
from tests.integration.conftest import Deployment, make_order, rows_for, wait_settled
from tests.integration.test_deadlines import running
from tests.support.processes import wait_until
from workers import db


def test_a_worker_killed_between_commit_and_publish_is_covered_by_the_relay(
    deployment: Deployment, fresh_sku: Callable[[int], str], tmp_path: Path, redis_url: str
) -> None:
    marker = tmp_path / "crashed"
    sku = fresh_sku(5)
    order = make_order(sku)
    # a broker of its own: no message left over by another test may hit the crash point
    with running(
        deployment,
        CELERY_BROKER_URL=redis_url,
        SAGAS_CRASH_POINT="after_commit",
        SAGAS_CRASH_MARKER=str(marker),
        SAGAS_RELAY_AFTER=1,
        SAGAS_RELAY_INTERVAL=0.5,
    ) as (worker, _beat):
        client = Celery(broker=redis_url)
        with client.connection_for_write(url=redis_url) as conn:
            client.send_task("order_fulfillment.start", args=[order], connection=conn)
        record = wait_settled([order["order_id"]], timeout=40)[order["order_id"]]
        wait_until(
            lambda: "signal 9" in worker.log_text() or "SIGKILL" in worker.log_text(),
            timeout=15,
            message="the pool child killed at the crash point",
        )
        log = worker.log_text()
    assert marker.exists(), "the crash point never fired"
    assert "relaying 1 unsent outbox message" in log
    assert record.state.value == "COMPLETED"
    for table in (db.reservations, db.payments, db.shipments, db.notifications):
        assert len(rows_for(table, order["order_id"])) == 1
    assert db.stock(sku) == 4


def _admitted_live(keys: list[str]) -> int:
    with db.get_engine().connect() as conn:
        return conn.execute(
            select(func.count())
            .select_from(sagas)
            .where(
                sagas.c.business_key.in_(keys),
                sagas.c.admitted.is_(True),
                sagas.c.state.in_(["STARTED", "PENDING", "COMPENSATING"]),
            )
        ).scalar_one()


def test_max_concurrent_admits_at_most_five_at_once_oldest_first(
    deployment: Deployment, start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    sku = fresh_sku(100)
    orders = [make_order(sku, simulate={"create_shipment": "slow:0.2"}) for _ in range(50)]
    keys = [o["order_id"] for o in orders]
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(_admitted_live(keys))
            stop.wait(0.02)

    sampler = threading.Thread(target=sample)
    with running(deployment, SAGAS_MAX_CONCURRENT=json.dumps({"order_fulfillment": 5})):
        sampler.start()
        try:
            for order in orders:  # created by the worker, which knows the limit
                start_saga.enqueue(order)
            records = wait_settled(keys, timeout=120)
        finally:
            stop.set()
            sampler.join()
    assert {r.state.value for r in records.values()} == {"COMPLETED"}
    assert max(samples) == 5, "the limit was reached and never exceeded"
    assert len(samples) > 20
    # admitted oldest first. The first five are admitted as they are created; two pool
    # children create sagas concurrently, so their commit order (and start times) may
    # swap neighbours. Later sagas wait for a slot (a saga takes >= 0.2 s): none of them
    # starts before the first five did.
    by_creation = sorted(records.values(), key=lambda r: r.created_at)
    first_started = [r.steps[0].started_at for r in by_creation]
    assert max(first_started[:5]) <= min(first_started[10:])
    assert first_started[0] <= min(first_started[5:])


def test_a_stuck_saga_is_reported_once_and_listed(
    deployment: Deployment, start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    order = make_order(fresh_sku(5), simulate={"process_payment": "hang"}, hang_seconds=4)
    with running(deployment, SAGAS_STUCK_AFTER=1) as (worker, beat):
        start_saga.delay(order)
        record = wait_until(
            lambda: saga_if_started(order["order_id"]), timeout=20, message="saga started"
        )
        wait_until(
            lambda: f"stuck saga {record.saga_id}" in worker.log_text(),
            timeout=20,
            message="stuck warning",
        )
        listed = subprocess.run(
            [
                sys.executable,
                "-m",
                "celery_sagas.cli",
                "list",
                "--stuck",
                "--stuck-after",
                "1",
                "--json",
            ],
            capture_output=True,
            text=True,
            env={**deployment.env, "PATH": "/usr/bin:/bin"},
            check=True,
        )
        ids = [s["saga_id"] for s in json.loads(listed.stdout)]
        assert record.saga_id in ids
        scans = beat.log_text().count("celery_sagas.scan")
        wait_until(
            lambda: beat.log_text().count("celery_sagas.scan") >= scans + 3,
            timeout=20,
            message="more scans",
        )
        final = wait_settled([order["order_id"]], timeout=30)[order["order_id"]]
        log = worker.log_text()
    assert log.count(f"stuck saga {record.saga_id}") == 1
    assert final.state.value == "COMPLETED"


def saga_if_started(key: str) -> Any:
    from tests.integration.conftest import saga_by_key

    return saga_by_key(key)
