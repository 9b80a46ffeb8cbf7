"""One handler's reaction to one event, Celery kept at arm's length: the handler runs in
its service's transaction behind its guard (``store.service_outbox``), the saga's
timeline is recorded (``store.choreography``), the events it published are delivered
and marked sent. An unexpected error is retried by the choreography's policy
(``policy.decide_retry``), then dead-lettered."""

from __future__ import annotations

import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery_sagas.choreography import (
    Choreography,
    OutgoingEvent,
    Reaction,
    automatic_actor,
    dead_letter_step,
    reaction_key,
)
from celery_sagas.encoding import encode_result
from celery_sagas.errors import BusinessError
from celery_sagas.log import logger
from celery_sagas.policy import RetryAt, decide_retry
from celery_sagas.redaction import redact, scrub, secret_values
from celery_sagas.runner import MAX_TRACEBACK, describe
from celery_sagas.store.choreography_dead_letters import bury, move
from celery_sagas.store.timeline_rows import Consumed

if TYPE_CHECKING:
    from celery_sagas.integration.choreography import ChoreographySubscriber


class Event:
    """What a handler receives: the event (``saga_id``, ``name``, ``event_id``, ``data``,
    ``attempt``) and ``publish(name, data)`` for the events it reacts with, which leave
    only if its transaction commits."""

    def __init__(
        self,
        choreography: Choreography,
        subscription: Subscription,
        saga_id: str,
        name: str,
        event_id: str,
        data: Mapping[str, Any],
        attempt: int,
    ) -> None:
        self.choreography = choreography
        self.subscription = subscription
        self.saga_id = saga_id
        self.name = name
        self.event_id = event_id
        self.data = data
        self.attempt = attempt
        self.published: list[OutgoingEvent] = []

    def publish(self, name: str, data: Mapping[str, Any] | None = None) -> None:
        self.choreography.check_event(name)
        self.published.append(self.outgoing(name, data or {}))

    def outgoing(self, name: str, data: Mapping[str, Any]) -> OutgoingEvent:
        encoded = encode_result(dict(data), f"event {name}")
        assert isinstance(encoded, dict)
        return OutgoingEvent(
            event_id=str(uuid.uuid4()),
            saga_id=self.saga_id,
            name=name,
            service=self.subscription.service,
            data=encoded,
            handler=self.subscription.handler,
            caused_by=self.event_id,
        )

    def __repr__(self) -> str:
        return f"<Event {self.name} {self.event_id} of saga {self.saga_id}>"


Handler = Callable[[Event, Any], Any]


@dataclass(frozen=True)
class Subscription:
    """One handler subscribed to one event, on its service's queue."""

    event: str
    service: str
    function: Handler
    task_name: str
    queue: str
    on_business_error: str | None = None
    business_errors: tuple[type[BaseException], ...] = (BusinessError,)

    @property
    def handler(self) -> str:
        """``service.function``: the handler's name in guards, reactions and the timeline."""
        return f"{self.service}.{self.function.__name__}"


@dataclass(frozen=True)
class Delivery:
    """An event message as a handler task receives it."""

    saga_id: str
    event: str
    event_id: str
    data: Mapping[str, Any]
    dead_letter: int | None = None


@dataclass(frozen=True)
class Retry:
    """Raise Celery's retry in ``delay`` seconds."""

    delay: float
    error: str


def react(
    subscriber: ChoreographySubscriber,
    subscription: Subscription,
    delivery: Delivery,
    tries: int,
) -> str | Retry:
    """``tries``: this delivery's try (1 unless a retry). Returns the outcome (``ok``,
    ``business``, ``duplicate``, ``dead``) or a ``Retry``."""
    choreography = subscriber.choreography
    event = Event(
        choreography,
        subscription,
        delivery.saga_id,
        delivery.event,
        delivery.event_id,
        delivery.data,
        tries,
    )

    def work(tx: Any) -> Sequence[OutgoingEvent]:
        subscription.function(event, tx)
        return event.published

    def on_business(exc: BaseException) -> Sequence[OutgoingEvent]:
        assert subscription.on_business_error is not None
        reason = _said(subscriber, describe(exc), delivery.data)
        return [event.outgoing(subscription.on_business_error, {**delivery.data, "reason": reason})]

    def track(tx: Any, reaction: Reaction) -> None:
        """The timeline in the handler's own transaction (its service database is the
        saga database): one commit per hop, and no window between the two."""
        subscriber.store.record_in(
            tx, choreography, delivery.saga_id, _consumed(subscription, delivery, reaction),
            reaction.events, now,
        )  # fmt: skip

    now = subscriber.clock()
    together = subscriber.service_url(subscription.service) == subscriber.settings.database_url
    try:
        reaction = subscriber.service_outbox(subscription.service).react(
            delivery.saga_id,
            subscription.handler,
            delivery.event_id,
            work,
            on_business if subscription.on_business_error else None,
            subscription.business_errors,
            now,
            track if together else None,
        )
    except Exception as exc:
        return _failed(subscriber, subscription, delivery, exc, tries)
    if not together:
        subscriber.store.record(
            choreography, delivery.saga_id, _consumed(subscription, delivery, reaction),
            reaction.events, subscriber.clock(),
        )  # fmt: skip
    # a duplicate publishes nothing: what its first run left unsent is the relay's
    if reaction.outcome != "duplicate":
        subscriber.publish_service_events(subscription.service, reaction.events)
    if delivery.dead_letter is not None:
        move(
            subscriber.store,
            delivery.dead_letter,
            "resolved",
            subscriber.clock(),
            automatic_actor(subscription.handler),
            "re-delivered event handled",
        )
    return reaction.outcome


def _consumed(subscription: Subscription, delivery: Delivery, reaction: Reaction) -> Consumed:
    """The reaction as the timeline records it (a duplicate: as its first run did; the
    timeline rows are written once either way)."""
    outcome = reaction.recorded or reaction.outcome
    return Consumed(delivery.event_id, subscription.handler, delivery.event, outcome)


def _said(subscriber: ChoreographySubscriber, text: str, data: Mapping[str, Any]) -> str:
    return scrub(text, secret_values(data, subscriber.redact_fields))


def _failed(
    subscriber: ChoreographySubscriber,
    subscription: Subscription,
    delivery: Delivery,
    exc: Exception,
    tries: int,
) -> str | Retry:
    said = _said(subscriber, describe(exc), delivery.data)
    now = subscriber.clock()
    key = reaction_key(delivery.saga_id, subscription.handler, delivery.event_id)
    extra = {
        "saga_id": delivery.saga_id,
        "saga": subscriber.choreography.name,
        "step": subscription.handler,
    }
    try:
        subscriber.saga_store.record_attempt(delivery.saga_id, key, tries, said, now)
    except Exception as lost:  # the policy still decides; the row is lost
        logger.warning(
            "saga %s %s: attempt not recorded: %s",
            delivery.saga_id,
            subscription.handler,
            lost,
            extra=extra,
        )
    decision = decide_retry(subscriber.choreography.retry, tries, True, now)
    if isinstance(decision, RetryAt):
        logger.warning(
            "saga %s %s on %s attempt %d failed (%s); retry in %.2fs",
            delivery.saga_id,
            subscription.handler,
            delivery.event,
            tries,
            said,
            decision.delay,
            extra=extra,
        )
        return Retry(decision.delay, said)
    logger.error(
        "saga %s %s on %s gave up after %d attempt(s): %s",
        delivery.saga_id,
        subscription.handler,
        delivery.event,
        tries,
        said,
        extra=extra,
    )
    trace = _said(subscriber, "".join(traceback.format_exception(exc)), delivery.data)
    step = dead_letter_step(subscription.handler, delivery.event_id)
    bury(
        subscriber.store,
        saga_id=delivery.saga_id,
        saga_name=subscriber.choreography.name,
        step=step,
        handler=subscription.handler,
        task_name=subscription.task_name,
        event=delivery.event,
        payload={
            "event": delivery.event,
            "event_id": delivery.event_id,
            "attempts_key": key,
            "data": redact(dict(delivery.data), subscriber.redact_fields),
        },
        attempts=tries,
        error=said,
        traceback=trace[-MAX_TRACEBACK:],
        now=now,
    )
    return "dead"
