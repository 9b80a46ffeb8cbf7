"""A step acts only when its saga expects it: forged, stale and replayed step messages are
delivered to a real worker and must change nothing in the participants' own tables."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select

from celery_sagas.store import SqlSagaStore
from celery_sagas.store.tables import guards
from tests.integration.conftest import Deployment, make_order, rows_for, wait_settled
from tests.support.processes import wait_until
from workers import db

PAYMENT = "order_fulfillment.process_payment"
REFUND = "order_fulfillment.refund_payment"


def _message(
    saga_id: str, step: int, token: int, key: str, order: dict[str, Any]
) -> dict[str, Any]:
    return {"saga_id": saga_id, "step": step, "token": token, "key": key, "payload": order}


def _guard_rows(key: str) -> int:
    with db.get_engine().connect() as conn:
        count = conn.execute(select(func.count()).select_from(guards).where(guards.c.key == key))
        return int(count.scalar_one())


def test_forged_stale_and_replayed_step_messages_run_no_participant(
    deployment: Deployment, start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    from workers.app import app

    sku = fresh_sku(10)
    order, other, never_started = make_order(sku), make_order(sku), make_order(sku)
    store = SqlSagaStore(db.database_url())
    with deployment.worker(name="checks-worker", quick_exit=True) as worker:
        start_saga.delay(order)
        start_saga.delay(other)
        records = wait_settled([order["order_id"], other["order_id"]])
        done, second = records[order["order_id"]], records[other["order_id"]]
        assert done.state.value == "COMPLETED" and second.state.value == "COMPLETED"
        transitions_before = len(store.transitions(done.saga_id))
        ghost = str(uuid.uuid4())
        ghost_key = f"{ghost}:process_payment:action"
        own_key = f"{done.saga_id}:process_payment:action"
        refund_key = f"{done.saga_id}:process_payment:compensation"
        foreign_key = f"{second.saga_id}:process_payment:action"
        forged = [
            # a saga that does not exist, carrying an order that was never started
            (PAYMENT, _message(ghost, 1, 2, ghost_key, never_started)),
            # a step index that is not this task's, for a finished saga
            (PAYMENT, _message(done.saga_id, 99, done.token, own_key, order)),
            # another saga's key on this saga's message
            (
                PAYMENT,
                _message(done.saga_id, 1, 2, foreign_key, order),
            ),
            # a refund for a COMPLETED order, with the key and token it would have had
            (
                REFUND,
                _message(
                    done.saga_id,
                    1,
                    done.token,
                    f"{done.saga_id}:process_payment:compensation",
                    order,
                ),
            ),
            # a replay of the payment step's own message, long after it completed
            (PAYMENT, {**_message(done.saga_id, 1, 2, own_key, order), "results": {}}),
        ]
        for name, kwargs in forged:
            app.send_task(name, kwargs=kwargs)

        def ignored_lines() -> list[str]:
            return [line for line in worker.log_text().splitlines() if "message ignored" in line]

        lines = wait_until(
            lambda: len(ignored_lines()) >= len(forged) and ignored_lines(),
            timeout=30,
            message="every forged message ignored",
        )

    reasons = sorted(line.rsplit("(", 1)[1].split(":", 1)[0] for line in lines)
    assert reasons == ["bad key", "bad key", "stale", "stale", "unknown saga"]
    assert any(ghost in line for line in lines)  # logged with the saga id
    # ground truth: the participants' own tables
    assert [p.status for p in rows_for(db.payments, order["order_id"])] == ["captured"]
    assert rows_for(db.payments, never_started["order_id"]) == []
    assert [p.status for p in rows_for(db.payments, other["order_id"])] == ["captured"]
    assert db.stock(sku) == 10 - 2
    # and nothing written for the sagas either: no junk guard rows, no transitions
    assert _guard_rows(ghost_key) == 0
    assert _guard_rows(refund_key) == 0
    assert len(store.transitions(done.saga_id)) == transitions_before
    assert store.find(order["order_id"]).state.value == "COMPLETED"
