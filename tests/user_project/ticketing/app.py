"""The shop's Celery app: its own task, and the ticket-order saga installed beside it.

``celery -A ticketing.app worker`` / ``beat``; the broker is ``CELERY_BROKER_URL``.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, signals

from celery_sagas import install
from ticketing import db
from ticketing.sagas import ticket_order

app = Celery("ticketing")
app.conf.task_default_queue = os.environ.get("TICKETING_QUEUE", "celery")
app.conf.broker_connection_retry_on_startup = True
if str(app.conf.broker_url or "").startswith("amqp"):
    app.conf.broker_transport_options = {"confirm_publish": True}


def send_newsletter(address: str) -> str:
    """The shop's own task: install() must not change how it is delivered."""
    return f"sent to {address}"


newsletter = app.task(name="ticketing.send_newsletter")(send_newsletter)

sagas = install(app, [ticket_order])
start_ticket_order = sagas.start_task("ticket_order")


def _fresh_connections(**_: Any) -> None:
    db.dispose()


signals.worker_process_init.connect(_fresh_connections, weak=False)
