"""``celery -A tests.integration.inline_app worker``: the example order saga's participants
in a saga whose steps have no time limit (``timeout=None``), installed with
``inline_steps``; its tasks go to the queue ``inline``.

With ``INLINE_APP_DUPLICATES=1`` every message it publishes is published twice
(``duplicating_app``); with ``INLINE_APP_INLINE=0`` the same saga runs in the default mode
(every step published); ``INLINE_APP_TIMEOUT=S`` gives every step a timeout of S seconds,
except the steps ``INLINE_APP_UNTIMED`` names (comma-separated).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, signals

from celery_sagas import Saga, Step, install
from workers import config, db
from workers.participants import (
    cancel_shipment,
    create_shipment,
    process_payment,
    refund_payment,
    release_inventory,
    reserve_inventory,
    send_cancellation_notice,
    send_confirmation,
)
from workers.validation import validate_order

QUEUE = "inline"
TIMEOUT = float(os.environ["INLINE_APP_TIMEOUT"]) if os.environ.get("INLINE_APP_TIMEOUT") else None
UNTIMED = set(filter(None, os.environ.get("INLINE_APP_UNTIMED", "").split(",")))


def timeout_of(step: str) -> float | None:
    return None if step in UNTIMED else TIMEOUT


app = Celery("inline")
app.conf.broker_url = config.broker_url()
app.conf.broker_transport_options = config.broker_transport_options(app.conf.broker_url)
app.conf.task_ignore_result = True
app.conf.broker_connection_retry_on_startup = True
app.conf.task_default_queue = QUEUE

inline_orders = Saga(
    "inline_orders",
    business_key="order_id",
    validate=validate_order,
    steps=[
        Step(
            "reserve_inventory",
            reserve_inventory,
            release_inventory,
            timeout=timeout_of("reserve_inventory"),
        ),
        Step(
            "process_payment",
            process_payment,
            refund_payment,
            timeout=timeout_of("process_payment"),
        ),
        Step(
            "create_shipment",
            create_shipment,
            cancel_shipment,
            timeout=timeout_of("create_shipment"),
        ),
        Step(
            "send_confirmation",
            send_confirmation,
            send_cancellation_notice,
            timeout=timeout_of("send_confirmation"),
        ),
    ],
)
sagas = install(
    app,
    [inline_orders],
    database_url=config.saga_database_url(),
    inline_steps=os.environ.get("INLINE_APP_INLINE", "1") == "1",
)
start_inline = sagas.start_task("inline_orders")

if os.environ.get("INLINE_APP_DUPLICATES") == "1":
    from tests.integration import duplicating_app  # noqa: F401  (importing it enables it)


@signals.worker_process_init.connect(weak=False)
def _fresh_participant_connections(**_: Any) -> None:
    db.dispose_engine()


@signals.after_setup_logger.connect(weak=False)
def _log_saga_transitions(**_: Any) -> None:
    logging.getLogger("celery_sagas").setLevel(logging.INFO)
