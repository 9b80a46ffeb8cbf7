"""The example app whose choreography delivers every event message twice (a broker that
redelivers everything): ``celery -A tests.support.choreo_twice_app worker``."""

from __future__ import annotations

from typing import Any

from workers.app import app, order_choreography

__all__ = ["app", "deliver_twice"]


def deliver_twice(subscriber: Any) -> None:
    """Make ``subscriber`` send each event message twice (undo: ``del subscriber.deliver``)."""
    once = type(subscriber).deliver.__get__(subscriber)

    def twice(*args: Any, **kwargs: Any) -> int:
        return once(*args, **kwargs) + once(*args, **kwargs)

    subscriber.deliver = twice


deliver_twice(order_choreography)
