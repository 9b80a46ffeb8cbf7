"""A Celery app with two saga types that share business keys (``jsonbug`` and ``transfer``,
both keyed by ``key``): ``--app tests.support.two_sagas_app`` for the CLI tests.

The database comes from ``SAGAS_DATABASE_URL``; the broker is never used by the tests that
load it (they create sagas with ``runtime.coordinator.start`` and publish nothing).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from celery_sagas import Saga, Step, install


def debit(ctx: Any) -> dict[str, Any]:
    return {}


def undo_debit(ctx: Any) -> dict[str, Any]:
    return {}


def credit(ctx: Any) -> dict[str, Any]:
    return {}


def undo_credit(ctx: Any) -> dict[str, Any]:
    return {}


def _saga(name: str) -> Saga:
    return Saga(
        name,
        business_key="key",
        steps=[
            Step("debit", action=debit, compensation=undo_debit),
            Step("credit", action=credit, compensation=undo_credit),
        ],
    )


jsonbug, transfer = _saga("jsonbug"), _saga("transfer")


def make_app(database_url: str) -> Celery:
    celery_app = Celery("two_sagas", broker=os.environ.get("CELERY_BROKER_URL", "memory://"))
    celery_app.conf.broker_connection_retry_on_startup = True
    install(celery_app, [jsonbug, transfer], database_url=database_url)
    return celery_app


app = make_app(os.environ.get("SAGAS_DATABASE_URL", "sqlite://"))
