"""Two versions of the order saga at once: a worker of the older deploy (version 1) and one
of the newer (versions 1 and 2) on the same broker. Sagas started on version 1 finish on
it; new starts run version 2 (five steps), which the older worker never touches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from celery_sagas.store import SqlSagaStore
from tests.integration.conftest import Deployment, make_order, rows_for, wait_settled
from tests.support.processes import CeleryProcess
from workers import db

APP = "tests.integration.versioned_app"


@contextmanager
def two_deploys(deployment: Deployment) -> Iterator[tuple[CeleryProcess, CeleryProcess]]:
    with ExitStack() as stack:
        old, new = (
            stack.enter_context(
                deployment.worker(
                    APP,
                    name=f"deploy-{name}",
                    env={**deployment.env, "SAGA_VERSIONS": versions},
                    concurrency=1,
                )
            )
            for name, versions in (("old", "1"), ("new", "1,2"))
        )
        yield old, new


def test_sagas_finish_on_the_version_they_started_with(
    deployment: Deployment, fresh_sku: Callable[[int], str]
) -> None:
    from tests.integration.versioned_app import ORDER_V2, make_app
    from workers.sagas import order_fulfillment

    _, old_runtime = make_app("1")
    _, new_runtime = make_app("1,2")
    sku = fresh_sku(20)
    v1_orders = [make_order(sku) for _ in range(4)]
    v2_orders = [make_order(sku) for _ in range(4)]

    def start(runtime: Any, order: dict[str, Any]) -> None:
        started = runtime.coordinator.start("order_fulfillment", order)
        runtime.publish(started.messages)

    with two_deploys(deployment) as (old, new):
        for v1, v2 in zip(v1_orders, v2_orders, strict=True):
            start(old_runtime, v1)  # what the older deploy's application starts
            start(new_runtime, v2)  # the newer deploy's: the newest version
        records = wait_settled([o["order_id"] for o in v1_orders + v2_orders], timeout=90)
        old_log, new_log = old.log_text(), new.log_text()

    store = SqlSagaStore(db.database_url())
    for order in v1_orders:
        record = records[order["order_id"]]
        assert record.state.value == "COMPLETED", store.transitions(record.saga_id)
        assert record.definition == order_fulfillment.fingerprint
        assert len(record.steps) == 4
        kinds = [n.kind for n in rows_for(db.notifications, order["order_id"])]
        assert kinds == ["confirmation"]
    for order in v2_orders:
        record = records[order["order_id"]]
        assert record.state.value == "COMPLETED", store.transitions(record.saga_id)
        assert record.definition == ORDER_V2.fingerprint
        assert [s.name for s in record.steps][-1] == "record_audit"
        kinds = sorted(n.kind for n in rows_for(db.notifications, order["order_id"]))
        assert kinds == ["audit", "confirmation"]
    # the older deploy never received a version-2 step; the newer one ran them all
    assert "order_fulfillment.v2." not in old_log
    assert "order_fulfillment.v2.record_audit" in new_log
    assert db.stock(sku) == 20 - 8
