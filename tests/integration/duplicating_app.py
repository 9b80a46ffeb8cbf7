"""``celery -A tests.integration.duplicating_app worker``: the example app, except that every
message it publishes is published a second time, byte for byte (same task id), with kombu.

That is what a broker redelivery or a retried publish looks like to the consumers: every
step, compensation and coordinator message arrives twice.
"""

from __future__ import annotations

from typing import Any

import redis
from celery import signals

from workers.app import app

DUPLICATES_KEY = "test:duplicates_published"


def publish_duplicate(
    body: Any = None,
    exchange: str = "",
    routing_key: str = "",
    headers: dict[str, Any] | None = None,
    properties: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    properties = properties or {}
    with app.producer_or_acquire() as producer:
        producer.publish(
            body,
            exchange=exchange or "",
            routing_key=routing_key,
            headers=dict(headers or {}),
            serializer="json",
            correlation_id=properties.get("correlation_id"),
            reply_to=properties.get("reply_to"),
            retry=True,
        )
    redis.Redis.from_url(app.conf.broker_url).incr(DUPLICATES_KEY)


def enable() -> None:
    signals.before_task_publish.connect(publish_duplicate, weak=False)


def disable() -> None:
    signals.before_task_publish.disconnect(publish_duplicate)


enable()
