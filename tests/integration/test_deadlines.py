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
def running(
    deployment: Deployment,
    beats: int = 1,
    beat_loglevel: str = "DEBUG",
    concurrency: int = 2,
    **env: Any,
) -> Iterator[list[CeleryProcess]]:
    """A prefork worker and ``beats`` beat processes with extra settings in ``env``. Beats
    log at DEBUG by default: at INFO the library drops their "Sending due task" lines for
    the scan and the relay (nothing periodic at INFO), and tests count those lines."""
    settings = {"SAGAS_SCAN_INTERVAL": str(SCAN), **{k: str(v) for k, v in env.items()}}
    full_env = {**deployment.env, **settings}
    with ExitStack() as stack:
        worker = deployment.worker(
            name="deadline-worker", env=full_env, concurrency=concurrency, quick_exit=True
        )
        processes = [stack.enter_context(worker)]
        for number in range(beats):
            beat = CeleryProcess(
                "workers.app",
                kind="beat",
                log_dir=deployment.log_dir / f"beat{number}",
                env=full_env,
                name=f"beat{number}",
                loglevel=beat_loglevel,
            )
            processes.append(stack.enter_context(beat))
        # on leaving: the beats' warm shutdown, then the worker's quick exit (if idle)
        yield processes


def _store() -> SqlSagaStore:
    return SqlSagaStore(db.database_url())


def _undo_guards(saga_id: str, step: str) -> int:
    with db.get_engine().connect() as conn:
        return int(
            conn.execute(
                select(func.count())
                .select_from(guards)
                .where(guards.c.key == f"{saga_id}:{step}:compensation")
            ).scalar_one()
        )


def test_a_hanging_step_is_interrupted_at_its_timeout_and_compensated(
    deployment: Deployment, start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    """The soft time limit (the step's timeout) interrupts the participant: the step is
    timed out and compensated at once, and the hung call never acts afterwards."""
    sku = fresh_sku(10)
    order = make_order(sku, qty=2, simulate={"create_shipment": "hang"}, hang_seconds=6)
    timeouts = json.dumps({"order_fulfillment.create_shipment": 2})
    with running(deployment, SAGAS_STEP_TIMEOUTS=timeouts) as (worker, _beat):
        start_saga.delay(order)
        record = wait_settled([order["order_id"]], timeout=30)[order["order_id"]]
        log = worker.log_text()
    assert record.state.value == "FAILED"
    assert [s.status.value for s in record.steps] == [
        "compensated",
        "compensated",
        "compensated",
        "skipped",
    ]
    shipment = record.steps[2]
    assert shipment.error_kind.value == "timeout"
    assert "SoftTimeLimitExceeded" in (shipment.error or "")
    first_compensation = shipment.compensation_started_at - shipment.started_at
    assert first_compensation.total_seconds() <= 2 + 2  # the timeout, not the 6 s hang
    assert "Soft time limit (2" in log
    order_of_undo = [t.step for t in _store().transitions(record.saga_id) if t.new == "compensated"]
    assert order_of_undo == ["create_shipment", "process_payment", "reserve_inventory"]
    assert db.stock(sku) == 10
    # the interrupted call never created a shipment: its compensation found nothing to
    # cancel (it leaves a tombstone so a late create cannot act)
    assert [s.status for s in rows_for(db.shipments, order["order_id"])] == ["cancelled"]
    assert rows_for(db.notifications, order["order_id"]) == []  # never confirmed
    assert _undo_guards(record.saga_id, "create_shipment") == 1


def test_a_participant_that_ignores_its_soft_limit_is_killed_at_the_hard_limit(
    deployment: Deployment, start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    """A participant that swallows ``SoftTimeLimitExceeded`` keeps its pool child busy
    until the hard limit (timeout + grace) replaces the child; the worker records the step
    as timed out, so the saga is compensated and the worker's slot is free again."""
    sku = fresh_sku(10)
    stubborn = make_order(sku, simulate={"create_shipment": "stubborn"}, hang_seconds=60)
    healthy = make_order(sku)
    timeouts = json.dumps({"order_fulfillment.create_shipment": 1.5})
    with running(deployment, SAGAS_STEP_TIMEOUTS=timeouts, SAGAS_TIME_LIMIT_GRACE=1) as (
        worker,
        _beat,
    ):
        start_saga.delay(stubborn)
        record = wait_settled([stubborn["order_id"]], timeout=30)[stubborn["order_id"]]
        start_saga.delay(healthy)  # the slot the stubborn call held serves again
        after = wait_settled([healthy["order_id"]], timeout=30)[healthy["order_id"]]
        log = worker.log_text()
    assert "Hard time limit (2.5" in log
    assert record.state.value == "FAILED"
    assert record.steps[2].status.value == "compensated"
    assert record.steps[2].error_kind.value == "timeout"
    assert "hard time limit" in (record.steps[2].error or "")
    assert [p.status for p in rows_for(db.payments, stubborn["order_id"])] == ["refunded"]
    assert after.state.value == "COMPLETED"
    assert db.stock(sku) == 10 - 1


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
    # 200 sagas whose first step waits for a worker, at most 0.3 s (queue_timeout), with
    # no message in flight (nothing is published): only the scanner can move them.
    coordinator = Coordinator(
        store,
        {"order_fulfillment": order_fulfillment},
        timing=Timing(queue_timeout=0.3, max_redispatches=0),
    )
    ids = [coordinator.start("order_fulfillment", make_order(sku)).saga_id for _ in range(200)]
    with db.get_engine().begin() as conn:
        conn.execute(update(outbox).where(outbox.c.saga_id.in_(ids)).values(sent_at=func.now()))
    with running(deployment, beats=2, SAGAS_SCAN_BATCH=25, SAGAS_QUEUE_TIMEOUT=0.3) as (
        _worker,
        beat_a,
        beat_b,
    ):

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
    # re-send a step no worker began after 8 s (then 16 s later, …)
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


def test_ten_hung_participants_do_not_stop_a_two_slot_worker(
    deployment: Deployment, start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    """10 orders whose shipment hangs for an hour, a worker with 2 slots: each hung call is
    cut off at its timeout, every saga settles, and a healthy order queued behind them
    completes."""
    sku = fresh_sku(20)
    hung = [make_order(sku, simulate={"create_shipment": "hang"}) for _ in range(10)]
    healthy = make_order(sku)
    timeouts = json.dumps({"create_shipment": 2})
    with running(deployment, SAGAS_STEP_TIMEOUTS=timeouts, SAGAS_TIME_LIMIT_GRACE=1):
        for order in hung:
            start_saga.delay(order)
        start_saga.delay(healthy)
        records = wait_settled([o["order_id"] for o in [*hung, healthy]], timeout=90)
    assert {records[o["order_id"]].state.value for o in hung} == {"FAILED"}
    assert records[healthy["order_id"]].state.value == "COMPLETED"
    for order in hung:
        assert [p.status for p in rows_for(db.payments, order["order_id"])] == ["refunded"]
        assert rows_for(db.notifications, order["order_id"]) == []
    assert db.stock(sku) == 20 - 1


def test_compensations_waiting_in_a_busy_queue_are_never_dead_lettered(
    deployment: Deployment, start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    """8 refunds of 1 s each queue behind one slot, far longer than their re-send interval
    (0.5 s): they are re-sent, waited for, and all run; none is declared failed."""
    sku = fresh_sku(20)
    orders = [
        make_order(sku, simulate={"create_shipment": "fail", "refund_payment": "slow:1"})
        for _ in range(8)
    ]
    timeouts = json.dumps({"process_payment": 1.5})
    with running(deployment, SAGAS_STEP_TIMEOUTS=timeouts, concurrency=1) as (worker, _beat):
        for order in orders:
            start_saga.delay(order)
        records = wait_settled([o["order_id"] for o in orders], timeout=120)
        log = worker.log_text()
    assert "re-sent" in log  # the scanner did re-send waiting refunds
    assert {r.state.value for r in records.values()} == {"FAILED"}
    ids = {r.saga_id for r in records.values()}
    assert not [d for d in _store().dead_letters(limit=10_000) if d.saga_id in ids]
    for order in orders:
        assert [p.status for p in rows_for(db.payments, order["order_id"])] == ["refunded"]
    assert db.stock(sku) == 20
