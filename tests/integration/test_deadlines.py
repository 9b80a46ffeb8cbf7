"""Deadlines and the beat scanner on real worker and beat processes (PostgreSQL + Redis)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import redis
from sqlalchemy import func, select, update

from celery_sagas.coordinator import Coordinator, Timing
from celery_sagas.store import SqlSagaStore
from celery_sagas.store.tables import guards, outbox, sagas
from tests.integration.conftest import Deployment, make_order, rows_for, wait_settled
from tests.support.processes import CeleryProcess, wait_until
from workers import db
from workers.sagas import order_fulfillment

SCAN = 0.5


@contextmanager
def running(deployment: Deployment, beats: int = 1, **env: Any) -> Iterator[list[CeleryProcess]]:
    """A prefork worker and ``beats`` beat processes with extra settings in ``env``."""
    settings = {"SAGAS_SCAN_INTERVAL": str(SCAN), **{k: str(v) for k, v in env.items()}}
    full_env = {**deployment.env, **settings}
    with ExitStack() as stack:
        processes = [stack.enter_context(deployment.worker(name="deadline-worker", env=full_env))]
        for number in range(beats):
            beat = CeleryProcess(
                "workers.app",
                kind="beat",
                log_dir=deployment.log_dir / f"beat{number}",
                env=full_env,
                name=f"beat{number}",
            )
            processes.append(stack.enter_context(beat))
        yield processes


def _store() -> SqlSagaStore:
    return SqlSagaStore(db.database_url())


def test_a_hanging_step_times_out_and_its_late_reply_changes_nothing(
    deployment: Deployment, start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    sku = fresh_sku(10)
    order = make_order(sku, qty=2, simulate={"create_shipment": "hang"}, hang_seconds=6)
    timeouts = json.dumps({"order_fulfillment.create_shipment": 2})
    with running(deployment, SAGAS_STEP_TIMEOUTS=timeouts) as (worker, _beat):
        start_saga.delay(order)
        record = wait_settled([order["order_id"]], timeout=30)[order["order_id"]]
        assert record.state.value == "FAILED"
        assert [s.status.value for s in record.steps] == [
            "compensated",
            "compensated",
            "compensated",
            "skipped",
        ]
        assert record.steps[2].error_kind.value == "timeout"
        shipment = record.steps[2]
        first_compensation = shipment.compensation_started_at - shipment.started_at
        assert first_compensation.total_seconds() <= 2 + SCAN + 1
        order_of_undo = [
            t.step for t in _store().transitions(record.saga_id) if t.new == "compensated"
        ]
        assert order_of_undo == ["create_shipment", "process_payment", "reserve_inventory"]
        log_before = len(_store().transitions(record.saga_id))

        # the hanging step finishes afterwards: its reply is late and changes nothing
        def late_lines() -> list[str]:
            lines = worker.log_text().splitlines()
            return [line for line in lines if record.saga_id in line and "late" in line]

        lines = wait_until(late_lines, timeout=15, message="this saga's late reply logged")
    assert any("create_shipment" in line for line in lines)
    after = _store().find(order["order_id"])
    assert after.state.value == "FAILED"
    assert len(_store().transitions(record.saga_id)) == log_before
    assert db.stock(sku) == 10
    assert [s.status for s in rows_for(db.shipments, order["order_id"])] == ["cancelled"]
    with db.get_engine().connect() as conn:
        undo_rows = conn.execute(
            select(func.count())
            .select_from(guards)
            .where(guards.c.key == f"{record.saga_id}:create_shipment:compensation")
        ).scalar_one()
    assert undo_rows == 1


def test_a_saga_past_its_deadline_is_compensated(
    deployment: Deployment, start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    sku = fresh_sku(10)
    # each step is well within its own timeout; together they overrun the saga deadline
    order = make_order(sku, simulate={"process_payment": "slow:1.5", "create_shipment": "slow:1.5"})
    deadlines = json.dumps({"order_fulfillment": 2})
    with running(deployment, SAGAS_SAGA_DEADLINES=deadlines):
        # created by the worker, whose settings carry the deadline (this process's do not)
        start_saga.enqueue(order)
        record = wait_settled([order["order_id"]], timeout=30)[order["order_id"]]
    assert record.state.value == "FAILED"
    assert "saga deadline passed" in record.reason
    assert record.steps[0].status.value == "compensated"
    assert db.stock(sku) == 10
    assert all(p.status == "refunded" for p in rows_for(db.payments, order["order_id"]))


def _scans_sent(beat: CeleryProcess) -> int:
    return beat.log_text().count("celery_sagas.scan")


def test_two_beats_handle_each_of_200_overdue_steps_exactly_once(
    deployment: Deployment, fresh_sku: Callable[[int], str]
) -> None:
    sku = fresh_sku(1000)
    store = _store()
    # 200 sagas whose first step is running with a deadline 0.3 s away and no message
    # in flight (nothing is published): only the scanner can move them.
    coordinator = Coordinator(
        store,
        {"order_fulfillment": order_fulfillment},
        timing=Timing(step_timeouts={"reserve_inventory": 0.3}, max_redispatches=0),
    )
    ids = [coordinator.start("order_fulfillment", make_order(sku)).saga_id for _ in range(200)]
    with db.get_engine().begin() as conn:
        conn.execute(update(outbox).where(outbox.c.saga_id.in_(ids)).values(sent_at=func.now()))
    with running(deployment, beats=2, SAGAS_SCAN_BATCH=25) as (_worker, beat_a, beat_b):

        def all_failed() -> bool:
            with db.get_engine().connect() as conn:
                return (
                    conn.execute(
                        select(func.count())
                        .select_from(sagas)
                        .where(sagas.c.id.in_(ids), sagas.c.state == "FAILED")
                    ).scalar_one()
                    == 200
                )

        wait_until(all_failed, timeout=90, interval=0.2, message="200 sagas FAILED")
        # let both beats keep scanning a while longer: nothing may happen twice
        marks = (_scans_sent(beat_a) + 4, _scans_sent(beat_b) + 4)
        wait_until(
            lambda: _scans_sent(beat_a) >= marks[0] and _scans_sent(beat_b) >= marks[1],
            timeout=30,
            message="both beats kept scanning",
        )
    for saga_id in ids:
        log = store.transitions(saga_id)
        assert [t.new for t in log if t.step == "reserve_inventory"] == [
            "running",
            "timed_out",
            "compensating",
            "compensated",
        ], saga_id
    with db.get_engine().connect() as conn:
        undo = conn.execute(
            select(func.count())
            .select_from(guards)
            .where(
                guards.c.key.like("%:reserve_inventory:compensation"),
                guards.c.key.in_([f"{i}:reserve_inventory:compensation" for i in ids]),
            )
        ).scalar_one()
    assert undo == 200
    assert db.stock(sku) == 1000


def test_a_flushed_broker_in_the_middle_of_100_sagas_is_recovered_from_postgresql(
    deployment: Deployment, start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    """FLUSHDB of the broker's Redis DB (what FLUSHALL does to it) loses every queued and
    unacked message; the scanner re-sends each lost step from PostgreSQL."""
    sku = fresh_sku(1000)
    orders = [make_order(sku) for _ in range(100)]
    keys = [o["order_id"] for o in orders]
    # re-send a silent step after 8 s, give up on it after 24 s
    timeouts = json.dumps({name: 24 for name in order_fulfillment.step_names})
    with running(deployment, SAGAS_STEP_TIMEOUTS=timeouts) as (worker, _beat):
        for order in orders:  # created by the worker, with its step timeouts
            start_saga.enqueue(order)

        def finished() -> int:
            with db.get_engine().connect() as conn:
                return conn.execute(
                    select(func.count())
                    .select_from(sagas)
                    .where(sagas.c.business_key.in_(keys), sagas.c.finished_at.is_not(None))
                ).scalar_one()

        wait_until(
            lambda: 5 <= finished() < 100,
            timeout=60,
            interval=0.02,
            message="some, not all, sagas finished",
        )
        redis.Redis.from_url(deployment.broker_url).flushdb()
        lost = 100 - finished()
        records = wait_settled(keys, timeout=90)
        log = worker.log_text()
    assert lost > 0
    assert "re-sent" in log
    assert {r.state.value for r in records.values()} == {"COMPLETED"}
    for key in keys:
        assert len(rows_for(db.payments, key)) == 1
        assert len(rows_for(db.reservations, key)) == 1
        assert len(rows_for(db.notifications, key)) == 1
    assert db.stock(sku) == 1000 - 100
