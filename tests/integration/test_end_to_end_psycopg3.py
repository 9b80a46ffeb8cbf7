"""The order saga end to end on psycopg 3 (``postgresql+psycopg://``): a real prefork
worker and the caller both on that driver; the ground truth read through psycopg2, in the
participants' own tables."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import select, text
from sqlalchemy.engine import make_url

from celery_sagas import install
from tests.integration.conftest import Deployment, make_order, rows_for, wait_settled
from tests.support.processes import CeleryProcess
from workers import db
from workers.sagas import order_fulfillment

APPLICATION = "e2e-psycopg3"


def on_psycopg3(deployment: Deployment, application_name: str) -> str:
    pytest.importorskip("psycopg")
    url = make_url(deployment.database_url).set(drivername="postgresql+psycopg")
    url = url.update_query_dict({"application_name": application_name})
    return url.render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def worker(deployment: Deployment) -> Iterator[CeleryProcess]:
    env = {**deployment.env, "SAGAS_DATABASE_URL": on_psycopg3(deployment, APPLICATION)}
    with deployment.worker(name="e2e-psycopg3", env=env, quick_exit=True) as process:
        yield process


@pytest.fixture(scope="module")
def start_saga(deployment: Deployment) -> Any:
    app = Celery("e2e-psycopg3-caller", broker=deployment.broker_url)
    url = on_psycopg3(deployment, "e2e-psycopg3-caller")
    return install(app, [order_fulfillment], database_url=url).start_task("order_fulfillment")


def test_a_saga_completes_and_a_failing_one_compensates_on_psycopg3(
    worker: CeleryProcess, start_saga: Any, fresh_sku: Callable[[int], str]
) -> None:
    sku = fresh_sku(10)
    done = make_order(sku, qty=3)
    failing = make_order(sku, qty=2, simulate={"send_confirmation": "fail"})
    start_saga.delay(done)
    start_saga.delay(failing)
    records = wait_settled([done["order_id"], failing["order_id"]])

    completed = records[done["order_id"]]
    assert completed.state.value == "COMPLETED"
    assert [s.status.value for s in completed.steps] == ["completed"] * 4
    assert [r.status for r in rows_for(db.reservations, done["order_id"])] == ["reserved"]
    assert [r.status for r in rows_for(db.payments, done["order_id"])] == ["captured"]
    assert [r.status for r in rows_for(db.shipments, done["order_id"])] == ["created"]
    assert [r.kind for r in rows_for(db.notifications, done["order_id"])] == ["confirmation"]

    failed = records[failing["order_id"]]
    assert failed.state.value == "FAILED"
    statuses = [s.status.value for s in failed.steps]
    assert statuses == ["compensated"] * 3 + ["failed"]
    assert [r.status for r in rows_for(db.payments, failing["order_id"])] == ["refunded"]
    assert [r.status for r in rows_for(db.shipments, failing["order_id"])] == ["cancelled"]
    assert db.stock(sku) == 7  # the failed order's 2 went back

    # the worker ran on the psycopg 3 URL: its pooled connections carry its name
    with db.get_engine().connect() as conn:
        names = conn.execute(
            select(text("application_name")).select_from(text("pg_stat_activity"))
        ).scalars()
        assert APPLICATION in set(names)
