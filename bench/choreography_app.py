"""The choreography benchmark's Celery app: ``celery -A bench.choreography_app worker``.

A 4-service no-op choreography: ``Placed`` → ``stock.reserve`` → ``Reserved`` →
``billing.charge`` → ``Charged`` → ``shipping.ship`` → ``Shipped`` → ``orders.close`` →
``Closed`` (5 events and 4 handler hops per saga, like the 4-step orchestrated bench
saga). Each handler does its guard + outbox transaction and publishes; nothing else.

Configured from the environment: ``CELERY_BROKER_URL`` and ``SAGAS_DATABASE_URL`` (the
services' guard and outbox tables live there too).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from celery_sagas import Choreography, choreography_subscriber

NAME = "bench_choreography"
EVENTS_PER_SAGA = 5
HOPS_PER_SAGA = 4

app = Celery("bench_choreography")
app.conf.broker_url = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/11")
app.conf.task_ignore_result = True
app.conf.broker_connection_retry_on_startup = True

flow = Choreography(
    NAME,
    start="Placed",
    events={"Reserved", "Charged", "Shipped"},
    succeeded="Closed",
    failed="Cancelled",
)
on = choreography_subscriber(app, flow, database_url=os.environ.get("SAGAS_DATABASE_URL", ""))


def _pass_on(published: str) -> Any:
    def handler(event: Any, tx: Any) -> None:
        event.publish(published, {"order": event.data["order"]})

    return handler


for _event, _service, _name, _next in (
    ("Placed", "stock", "reserve", "Reserved"),
    ("Reserved", "billing", "charge", "Charged"),
    ("Charged", "shipping", "ship", "Shipped"),
    ("Shipped", "orders", "close", "Closed"),
):
    _handler = _pass_on(_next)
    _handler.__name__ = _name
    on(_event, service=_service)(_handler)
