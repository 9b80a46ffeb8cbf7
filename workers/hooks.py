"""The order saga's outcome hooks: ``Saga(on_completed=…, on_failed=…)`` in ``workers.sagas``.

The library sends each hook once per saga through its outbox, with ``saga_id``,
``business_key`` and ``outcome`` (state, reason, and every step's status and result). Here
they record the outcome on the order's side (``order_outcomes``), where an application
would email the customer or update its order row.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from workers import db

ORDER_COMPLETED = "workers.order_completed"
ORDER_FAILED = "workers.order_failed"

log = logging.getLogger(__name__)


def record_outcome(hook: str, saga_id: str, business_key: str, outcome: dict[str, Any]) -> None:
    with db.get_engine().begin() as connection:
        connection.execute(
            db.order_outcomes.insert().values(
                order_id=business_key,
                saga_id=saga_id,
                hook=hook,
                state=outcome["state"],
                reason=outcome.get("reason"),
            )
        )
    log.info("order %s: %s (saga %s)", business_key, outcome["state"], saga_id)


def register(app: Celery) -> None:
    @app.task(name=ORDER_COMPLETED, shared=False, acks_late=True)
    def order_completed(saga_id: str, business_key: str, outcome: dict[str, Any]) -> None:
        record_outcome("on_completed", saga_id, business_key, outcome)

    @app.task(name=ORDER_FAILED, shared=False, acks_late=True)
    def order_failed(saga_id: str, business_key: str, outcome: dict[str, Any]) -> None:
        record_outcome("on_failed", saga_id, business_key, outcome)
