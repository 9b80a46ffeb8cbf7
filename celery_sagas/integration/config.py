"""What ``install`` checks on the host Celery app, and the delivery options of saga tasks.

``install`` changes nothing for the app's own tasks. The delivery settings the sagas need
(late acks, redelivery when a pool child dies, json) are options of the saga tasks
themselves (:data:`SAGA_TASK_OPTIONS`). Where only a global setting can make sagas correct,
the app is checked, never changed: a pickle-accepting app and a Redis visibility timeout
shorter than the steps' time limits are refused with an error naming the setting and the
value to use; RabbitMQ without publish confirms is left alone with one warning.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from celery import Celery

from celery_sagas.errors import SagaConfigurationError
from celery_sagas.log import logger

# on every saga task (step, compensation, start, coordinator, scan, relay, DLQ)
SAGA_TASK_OPTIONS: Mapping[str, Any] = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "serializer": "json",
}
UNSAFE_CONTENT = {"pickle", "application/x-python-serialize", "yaml", "application/x-yaml"}
REDIS_SCHEMES = ("redis", "rediss", "sentinel")
AMQP_SCHEMES = ("amqp", "pyamqp", "amqps")
# Celery's soft/hard time limits of a step task run past the step timeout by a grace
# period: the visibility timeout must outlast twice (timeout + this allowance)
TIME_LIMIT_ALLOWANCE = 300.0
VISIBILITY_MARGIN = 2.0
REDIS_DEFAULT_VISIBILITY_TIMEOUT = 3600  # kombu's default


def refuse_unsafe_content(conf: Any) -> None:
    """A worker that accepts pickle runs code from the broker: the sagas refuse to share it."""
    for key in ("accept_content", "result_accept_content"):
        accepted = {str(item) for item in conf.get(key) or ()}
        unsafe = sorted(accepted & UNSAFE_CONTENT)
        if unsafe:
            safe = sorted(accepted - UNSAFE_CONTENT) or ["json"]
            raise SagaConfigurationError(
                f"{key} allows {unsafe}: celery-sagas refuses an app that accepts them "
                f"(they run code from the broker). Set {key}={safe!r}."
            )
    serializer = conf.get("result_serializer")
    if serializer not in (None, "json"):
        raise SagaConfigurationError(
            f"result_serializer={serializer!r}: saga task results must be json. "
            "Set result_serializer='json'."
        )


def required_visibility_timeout(step_timeouts: Iterable[float]) -> int:
    """Seconds a Redis message may stay unacked before it is redelivered: more than twice
    the longest step time limit (its timeout plus the time-limit allowance)."""
    longest = max(step_timeouts, default=0.0)
    return int(VISIBILITY_MARGIN * (longest + TIME_LIMIT_ALLOWANCE))


def check_visibility_timeout(conf: Any, step_timeouts: Iterable[float]) -> None:
    """Redis redelivers an unacked message after ``visibility_timeout``: shorter than a
    step may run, and a running step is delivered to a second worker."""
    if not str(conf.broker_url or "").startswith(REDIS_SCHEMES):
        return
    options = conf.broker_transport_options or {}
    current = options.get("visibility_timeout", REDIS_DEFAULT_VISIBILITY_TIMEOUT)
    wanted = required_visibility_timeout(step_timeouts)
    if current < wanted:
        raise SagaConfigurationError(
            f"broker_transport_options['visibility_timeout'] is {current}s, shorter than twice "
            f"the longest step time limit (declared and configured step timeouts): Redis would "
            f"deliver a running step twice. Set broker_transport_options="
            f"{{'visibility_timeout': {wanted}}} (or more) in the Celery config."
        )


def warn_inline_runs_past_visibility(conf: Any, budgets: Iterable[float]) -> None:
    """``inline_steps``: a delivery holds its message unacked for its whole inline run, up
    to the message's budget. On Redis a budget longer than the visibility timeout lets a
    long run, every step within its own timeout, be delivered again mid-run, and the copy
    re-sends the step running then (a second run beside it). A warning, not a refusal:
    only runs that long are delivered twice."""
    if not str(conf.broker_url or "").startswith(REDIS_SCHEMES):
        return
    options = conf.broker_transport_options or {}
    current = options.get("visibility_timeout", REDIS_DEFAULT_VISIBILITY_TIMEOUT)
    longest = max(budgets, default=0.0)
    if current < longest:
        logger.warning(
            "celery-sagas: inline_steps: an inline run of timed steps may hold its message "
            "up to %gs (its budget), past broker_transport_options['visibility_timeout'] "
            "(%ss): Redis would deliver a run that long again, and the step it is running "
            "would run twice. Set {'visibility_timeout': %d} (or more) to rule it out.",
            longest,
            current,
            math.ceil(longest),
        )


def warn_without_publish_confirms(conf: Any) -> None:
    """RabbitMQ without publisher confirms can drop a publish the outbox marks sent."""
    if not str(conf.broker_url or "").startswith(AMQP_SCHEMES):
        return
    if (conf.broker_transport_options or {}).get("confirm_publish"):
        return
    logger.warning(
        "celery-sagas: broker_transport_options['confirm_publish'] is not set: a message "
        "RabbitMQ drops after the outbox marked it sent is only found again by the scanner "
        "(after the step timeout). Set broker_transport_options={'confirm_publish': True} "
        "to have publishes confirmed; install() leaves the app's setting as it is."
    )


def check_app(app: Celery, step_timeouts: Iterable[float]) -> None:
    """Refuse (or warn about) global settings under which sagas cannot be correct."""
    conf = app.conf
    refuse_unsafe_content(conf)
    check_visibility_timeout(conf, step_timeouts)
    warn_without_publish_confirms(conf)


def add_routes(app: Celery, routes: Mapping[str, Any]) -> None:
    """Route the saga tasks ``routes`` names, next to the app's own ``task_routes``: merged
    into a dict, or, when the app lists routers (functions, dotted names, dicts; Celery
    asks them in order), as one dict of ours ahead of them."""
    current = app.conf.task_routes
    if current is None or isinstance(current, Mapping):
        app.conf.task_routes = {**(current or {}), **routes}
        return
    routers = list(current) if isinstance(current, list | tuple) else [current]
    ours: dict[str, Any] | None = getattr(app, "_celery_sagas_routes", None)
    if ours is None or not routers or routers[0] is not ours:
        ours = {}
        app._celery_sagas_routes = ours
        routers.insert(0, ours)
    ours.update(routes)
    app.conf.task_routes = tuple(routers)
