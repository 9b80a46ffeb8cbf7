"""Reliability settings ``install`` enforces on the Celery app (at-least-once, json only)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from celery import Celery

from celery_sagas.errors import SagaConfigurationError

UNSAFE_CONTENT = {"pickle", "application/x-python-serialize", "yaml", "application/x-yaml"}
VISIBILITY_MARGIN = 2.0  # visibility timeout >= margin x the longest step timeout
MIN_VISIBILITY_TIMEOUT = 3600


def refuse_unsafe_content(conf: Any) -> None:
    for key in ("accept_content", "result_accept_content"):
        accepted = set(conf.get(key) or ())
        if accepted & UNSAFE_CONTENT:
            raise SagaConfigurationError(
                f"{key} allows {sorted(accepted & UNSAFE_CONTENT)}: celery-sagas accepts json "
                "only (pickle runs code from the broker). Set {key}=['json']."
            )
    for key in ("task_serializer", "result_serializer"):
        if conf.get(key) not in (None, "json"):
            raise SagaConfigurationError(f"{key}={conf.get(key)!r}: celery-sagas needs 'json'")


def apply_reliability_config(app: Celery, step_timeouts: Iterable[float]) -> None:
    """At-least-once delivery: late acks, redelivery when a pool child dies, prefetch 1."""
    conf = app.conf
    refuse_unsafe_content(conf)
    conf.task_acks_late = True
    conf.task_reject_on_worker_lost = True
    conf.worker_prefetch_multiplier = 1
    conf.accept_content = ["json"]
    conf.task_serializer = "json"
    conf.result_serializer = "json"
    conf.result_accept_content = ["json"]
    broker = str(conf.broker_url or "")
    options = dict(conf.broker_transport_options or {})
    if broker.startswith(("redis", "rediss", "sentinel")):
        longest = max(step_timeouts, default=0.0)
        wanted = max(MIN_VISIBILITY_TIMEOUT, longest * VISIBILITY_MARGIN)
        if options.get("visibility_timeout", 0) < wanted:
            options["visibility_timeout"] = int(wanted)
    if broker.startswith(("amqp", "pyamqp")):
        options.setdefault("confirm_publish", True)
    conf.broker_transport_options = options
