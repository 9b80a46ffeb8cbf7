"""The example order saga in two versions, for a rolling deploy: ``SAGA_VERSIONS=1`` is a
worker of the older deploy (version 1 only), ``SAGA_VERSIONS=1,2`` one of the newer (both:
new starts use version 2, sagas in flight finish on theirs).

Version 2 adds a fifth step, ``record_audit`` (a notification row of kind ``audit``)."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, signals

from celery_sagas import Saga, Step, StepContext, install
from celery_sagas.integration.runtime import SagaRuntime
from workers import config, db
from workers.participants import _act_once
from workers.sagas import order_fulfillment
from workers.validation import validate_order


def record_audit(ctx: StepContext) -> dict[str, Any]:
    row, _ = _act_once(ctx, db.notifications, {"status": "sent", "kind": "audit"})
    return {"audit_id": row.id}


def remove_audit(ctx: StepContext) -> dict[str, Any]:
    return {"undone": (ctx.result or {}).get("audit_id")}


ORDER_V2 = Saga(
    "order_fulfillment",
    version=2,
    business_key="order_id",
    validate=validate_order,
    steps=[*order_fulfillment.steps, Step("record_audit", record_audit, remove_audit)],
)


def make_app(versions: str) -> tuple[Celery, SagaRuntime]:
    app = Celery(f"versioned-{versions}")
    app.conf.broker_url = config.broker_url()
    app.conf.task_ignore_result = True
    app.conf.broker_connection_retry_on_startup = True
    sagas = [order_fulfillment] + ([ORDER_V2] if "2" in versions.split(",") else [])
    return app, install(app, sagas, database_url=config.saga_database_url())


app, runtime = make_app(os.environ.get("SAGA_VERSIONS", "1"))


@signals.worker_process_init.connect(weak=False)
def _fresh_participant_connections(**_: Any) -> None:
    db.dispose_engine()
