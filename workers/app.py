"""The example Celery app: ``celery -A workers.app worker|beat|flower``.

Configured from the environment (see ``workers.config``); the example sagas (order
fulfillment and bank transfer) are installed with one call.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, signals

from celery_sagas import install
from workers import choreography, config, db, hooks
from workers.sagas import EXAMPLE_SAGAS

app = Celery("workers")
app.conf.broker_url = config.broker_url()
app.conf.broker_transport_options = config.broker_transport_options(app.conf.broker_url)
app.conf.task_ignore_result = True
app.conf.worker_send_task_events = True
app.conf.broker_connection_retry_on_startup = True
sagas = install(app, EXAMPLE_SAGAS, database_url=config.saga_database_url())
hooks.register(app)
order_choreography = choreography.register(app)  # the choreographed order flow


@signals.worker_process_init.connect(weak=False)
def _fresh_participant_connections(**_: Any) -> None:
    db.dispose_engine()


@signals.after_setup_logger.connect(weak=False)
def _log_saga_transitions(**_: Any) -> None:
    """Celery configured logging; show the library's transition lines too."""
    logging.getLogger("celery_sagas").setLevel(logging.INFO)
