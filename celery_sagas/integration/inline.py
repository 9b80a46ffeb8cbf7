"""Inline steps (``inline_steps``, off by default): the next step runs in the task of the
step before it, in the same delivery, instead of being published.

A saga of four steps is then one Celery delivery instead of four: no publish, no queue
wait, no second message to decode, which roughly halves a saga's worker CPU and its
latency. Every step still goes through the one step path (``runner``): its check, its
``started`` marker, its participant and its outcome's transaction, in order.

What runs inline: the next action or compensation of the same saga (never another saga's
step, such as one a finished saga's free slot admits), routed to the queue this delivery
came from, and within the delivery's time limits:

- a step without a timeout, only in a delivery without a time limit (nothing would stop it
  short of the limit, which would then end the delivery, not the step);
- a step with a timeout, only in a prefork pool child, which gives each step its own
  limits (``integration.alarm``), and only while the step's limit still fits in the
  delivery's budget (never in a delivery without one, whose child nothing would replace
  if the alarm could not reach its participant). Celery's limits are per delivery, so
  with ``inline_steps`` a timed step's message carries the budget of the longest run it
  can begin (``budget``) as both its limits; a delivery under Celery's own per-step
  limits (a message from an app without ``inline_steps``, a retry from an inline run)
  runs nothing inline.

Anything else is published as before, and so is everything else a transition sends
(hooks, dead letters).

What a crash does: the delivery's message is acknowledged only when the whole run ends
(late acks), so a killed worker gives it back to the broker. The ``started`` marker of an
inline step names that delivery (the Celery task id of its message). The message, now
stale (its own step is done), finds the saga's current step begun by its own delivery and
without an outcome, and has it sent again (``runner.abandoned_by``, ``machine.Abandoned``).
A step that was committed but not yet begun when the worker died has no marker: the relay
publishes its outbox row as it does after any lost publish.

A participant that fails with a retry left is retried as a published message (Celery's
``retry`` on the inline run's own request), which ends the inline run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from celery import Celery, Task

from celery_sagas.integration.alarm import (
    POOL_ENV,
    alarm_usable,
    green_hard_limit,
    green_usable,
    step_limits,
)
from celery_sagas.integration.pools import pool_name
from celery_sagas.machine import Role
from celery_sagas.protocols import OutboxMessage
from celery_sagas.runner import Limits

# set in a worker's environment when the worker applies time limits to every task
WORKER_LIMITED = "CELERY_SAGAS_WORKER_TIME_LIMITED"
STEP_KINDS = frozenset(Role)  # the body kinds of step and compensation messages
# a follow-up for the delivery: the step task to run inline, with its kwargs
FollowUp = tuple[Task, dict[str, Any]]


# seconds of a delivery's hard limit kept free (the pool's timer started before the task)
MARGIN = 1.0


def time_limited(*limits: float | None) -> bool:
    """Pure: whether any of Celery's limits (task, message or app-wide) is set."""
    return any(limit for limit in limits)


def budget(timeouts: Sequence[float | None], grace: float, role: Role, index: int) -> float | None:
    """Pure: the time limit (hard and soft) of the message of step ``index``'s action or
    compensation with ``inline_steps``: every step it can run inline, at its timeout +
    ``grace`` — the timed actions from ``index`` up to the first untimed one, then every
    timed compensation at or below the highest it can reach. None when the step itself has
    no timeout (its message has no limit, as before)."""
    if timeouts[index] is None:
        return None
    total = MARGIN
    top = index
    if role == Role.ACTION:
        for later in range(index, len(timeouts)):
            timeout = timeouts[later]
            if timeout is None:
                break
            total += timeout + grace
        top = len(timeouts) - 1
    return total + sum(t + grace for t in timeouts[: top + 1] if t is not None)


def unlimited_steps(timeouts: Mapping[str, Sequence[float | None]]) -> dict[str, list[int]]:
    """Pure: per saga (name → its steps' timeouts), the indexes of the steps that may run
    inline (no timeout, so no Celery time limit)."""
    return {
        name: [index for index, timeout in enumerate(steps) if timeout is None]
        for name, steps in timeouts.items()
    }


def is_step_message(body: Mapping[str, Any]) -> bool:
    """A step or compensation message (the others: hooks, dead letters)."""
    return body.get("kind") in STEP_KINDS


@dataclass(frozen=True)
class InlineRun:
    """One delivery that may run the saga's next steps in it: the queue its message came
    from and its task id (which the inline steps' markers name)."""

    steps: InlineSteps
    queue: str | None
    delivery: str
    hard: float | None = None  # the delivery's hard limit (a budget), None: it has none
    alarm: bool = False  # this process gives each timed step its own limits
    green: bool = False  # a gevent worker: the message's own step gets its own hard limit
    began: float = field(default_factory=time.monotonic)

    def fits(self, task: Task) -> bool:
        """Whether ``task``'s step may run in this delivery: an untimed one only in a
        delivery without a limit; a timed one only where this process times it, under a
        budget (Celery's hard limit still ends a participant the alarm cannot reach), and
        while its hard limit still fits in what is left of it."""
        own: float | None = task.time_limit or task.soft_time_limit
        if not own:
            return self.hard is None
        if not self.alarm or self.hard is None:
            return False
        return time.monotonic() - self.began + own + MARGIN <= self.hard

    def limits(self, task: Task, on_stuck: Callable[[], None] | None = None) -> Limits | None:
        """``task``'s own limits, as this process arms them (None: Celery's apply, or none);
        ``on_stuck``: what the watchdog does before it ends a process stuck past them."""
        soft = task.soft_time_limit
        if self.alarm and soft:
            return partial(step_limits, soft, task.time_limit or soft, on_stuck)
        if self.green and task.time_limit:
            return partial(green_hard_limit, task.time_limit)
        return None

    def picks(self, saga_id: str) -> Callable[[OutboxMessage], FollowUp | None]:
        """What this delivery runs inline of a transition's messages: a step of the same
        saga only (a redelivery can find only its own saga's step abandoned), and only one
        this delivery may run; None: publish it."""

        def pick(message: OutboxMessage) -> FollowUp | None:
            if message.saga_id != saga_id:  # another saga's first step, admitted
                return None
            return self.steps.follow_up(message, self)

        return pick


class InlineSteps:
    """Decides, for one app, which deliveries and which next steps run inline."""

    def __init__(
        self,
        app: Celery,
        task_name: Callable[[Mapping[str, Any]], str],
        kwargs_of: Callable[[Mapping[str, Any]], dict[str, Any]],
    ) -> None:
        """``task_name`` and ``kwargs_of``: a step message's task and kwargs, as the
        dispatcher would publish them."""
        self.app = app
        self.task_name = task_name
        self.kwargs_of = kwargs_of

    def begin(self, task: Task, request: Any) -> InlineRun | None:
        """An inline run for the delivery ``request`` of ``task``, or None when it must
        not run steps inline: called directly or eagerly, under Celery's own per-step
        limits, or (a delivery without a budget) under app- or worker-wide limits.

        A budget (a timed step's message: both limits alike) replaces every other limit
        of the delivery, Celery's precedence, so this process always arms the step's own
        limits under one: the alarm in a prefork child, a greenlet timeout under gevent."""
        conf = self.app.conf
        if request.called_directly or request.is_eager or conf.task_always_eager:
            return None
        queue = (request.delivery_info or {}).get("routing_key")
        queue = queue or self.routing_key(task.name, {})
        hard, soft = request.timelimit or (None, None)
        if time_limited(hard, soft):
            if not (hard and soft == hard):
                return None  # Celery's own limits, for this step
            if alarm_usable():
                return InlineRun(self, queue, request.id, hard=hard, alarm=True)
            if green_usable():  # nothing timed runs inline; its own step keeps its hard limit
                return InlineRun(self, queue, request.id, hard=hard, green=True)
            return None  # threads, solo: they never applied a step's limits
        if time_limited(conf.task_time_limit, conf.task_soft_time_limit):
            return None
        if os.environ.get(WORKER_LIMITED):  # celery worker --time-limit/--soft-time-limit
            return None
        if time_limited(task.time_limit, task.soft_time_limit):  # Celery's, for this step
            return None
        return InlineRun(self, queue, request.id, alarm=alarm_usable())

    def follow_up(self, message: OutboxMessage, run: InlineRun) -> FollowUp | None:
        """The step task that may run ``message`` inline in the delivery ``run`` (its time
        limits fit, routed to the queue the delivery came from), with its kwargs; None:
        publish it."""
        body = message.body
        if not is_step_message(body):
            return None
        name = self.task_name(body)
        task = self.app.tasks.get(name)
        if task is None or not hasattr(task, "run_inline") or not run.fits(task):
            return None
        kwargs = self.kwargs_of(body)
        if self.routing_key(name, kwargs) != run.queue:
            return None
        return task, kwargs

    def routing_key(self, task_name: str, kwargs: Mapping[str, Any]) -> str | None:
        """Where the app's router would send ``task_name`` with ``kwargs`` (a router may
        route by them, so nothing is cached)."""
        route = self.app.amqp.router.route({}, task_name, (), dict(kwargs))
        queue = route["queue"]
        key: str | None = route.get("routing_key") or queue.routing_key or queue.name
        return key


def note_worker_limits(sender: Any = None, **_: Any) -> None:
    """``worker_init``: a worker started with ``--time-limit`` or ``--soft-time-limit``
    applies them to every delivery, which the app's config does not show; and only a
    prefork pool child may time steps itself (``alarm``). Both noted in the environment,
    which pool children inherit (forked or spawned)."""
    if time_limited(getattr(sender, "time_limit", None), getattr(sender, "soft_time_limit", None)):
        os.environ[WORKER_LIMITED] = "1"
    pool = getattr(sender, "pool_cls", None)
    if pool is not None:
        os.environ[POOL_ENV] = pool_name(pool)
