"""``coordinator_hop`` as it is meant: participant workers with no access to the saga
database run only signed step commands; the coordinator's workers record the outcomes.

A forged command (bad signature) and a late one (expired) are refused before any side
effect, checked in the participants' own tables."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from celery_sagas import signing
from tests.integration.conftest import Deployment, make_order, rows_for, wait_settled
from tests.support.processes import CeleryProcess, wait_until
from workers import db

KEY = "test-signing-key"
COORDINATOR_QUEUE = "sagas.coordinator"
PAYMENT = "order_fulfillment.process_payment"


@contextmanager
def split_deployment(deployment: Deployment) -> Iterator[tuple[CeleryProcess, CeleryProcess]]:
    hop = {
        "SAGAS_COORDINATOR_HOP": "true",
        "SAGAS_SIGNING_KEY": KEY,
        "SAGAS_COORDINATOR_QUEUE": COORDINATOR_QUEUE,
    }
    coordinator_env = {**deployment.env, **hop}
    participant_env = {
        "CELERY_BROKER_URL": deployment.broker_url,
        "PARTICIPANTS_DATABASE_URL": deployment.database_url,  # its own tables only
        **hop,
    }
    with ExitStack() as stack:
        coordinator = stack.enter_context(
            deployment.worker(
                name="hop-coordinator",
                env=coordinator_env,
                queues=[COORDINATOR_QUEUE, "sagas.control"],
                concurrency=1,
            )
        )
        participant = stack.enter_context(
            deployment.worker(
                name="hop-participant", env=participant_env, queues=["celery"], concurrency=1
            )
        )
        yield coordinator, participant


def _start(app: Any, order: dict[str, Any]) -> None:
    app.send_task("order_fulfillment.start", args=[order], queue=COORDINATOR_QUEUE)


def test_participant_workers_without_the_saga_database_run_signed_commands_only(
    deployment: Deployment, fresh_sku: Callable[[int], str]
) -> None:
    from workers.app import app

    sku = fresh_sku(10)
    order, failing = make_order(sku), make_order(sku, simulate={"create_shipment": "fail"})
    forged_order, late_order = make_order(sku), make_order(sku)
    with split_deployment(deployment) as (coordinator, participant):
        _start(app, order)
        _start(app, failing)
        records = wait_settled([order["order_id"], failing["order_id"]], timeout=60)
        done = records[order["order_id"]]
        command = {"saga_id": done.saga_id, "step": 1, "token": 2, "payload": forged_order}
        command["key"] = f"{done.saga_id}:process_payment:action"
        # forged: signed with another key; altered: a valid signature over other data
        forged = signing.sign(command, PAYMENT, "not-the-key", datetime.now(UTC) + timedelta(60))
        valid = signing.sign(command, PAYMENT, KEY, datetime.now(UTC) + timedelta(seconds=60))
        altered = {**valid, "payload": {**forged_order, "order_id": late_order["order_id"]}}
        late_command = {**command, "payload": late_order}
        late = signing.sign(late_command, PAYMENT, KEY, datetime.now(UTC) - timedelta(seconds=1))
        for kwargs in (forged, altered, late):
            app.send_task(PAYMENT, kwargs=kwargs, queue="celery")

        def refusals() -> list[str]:
            lines = participant.log_text().splitlines()
            return [line for line in lines if "signed command refused" in line]

        lines = wait_until(lambda: len(refusals()) >= 3 and refusals(), timeout=30)
        participant_log = participant.log_text()
        coordinator_log = coordinator.log_text()

    assert done.state.value == "COMPLETED"
    assert records[failing["order_id"]].state.value == "FAILED"
    assert "Task celery_sagas.advance[" in coordinator_log  # outcomes recorded there
    assert "order_fulfillment.process_payment[" not in coordinator_log
    assert "no saga database" not in participant_log and "Traceback" not in participant_log
    reasons = sorted(line.rsplit("(", 1)[1].split(":", 1)[0] for line in lines)
    assert reasons == ["bad signature", "bad signature", "late"]
    # ground truth: the participants' tables
    assert [p.status for p in rows_for(db.payments, order["order_id"])] == ["captured"]
    assert [p.status for p in rows_for(db.payments, failing["order_id"])] == ["refunded"]
    assert rows_for(db.payments, forged_order["order_id"]) == []
    assert rows_for(db.payments, late_order["order_id"]) == []
    assert db.stock(sku) == 10 - 1
