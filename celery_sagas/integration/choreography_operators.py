"""What operators do to a choreographed saga: replay the event whose reaction never
arrived, and retry or discard a dead handler (``celery-sagas replay`` and ``dlq``). Each
leaves a row in the saga's timeline naming who did it."""

from __future__ import annotations

from dataclasses import dataclass

from celery_sagas.choreography import PublishedEvent, awaiting_reaction
from celery_sagas.errors import SagaError, SagaNotFoundError
from celery_sagas.integration.choreography import ChoreographySubscriber
from celery_sagas.integration.reactions import Subscription
from celery_sagas.store.choreography_dead_letters import move


@dataclass(frozen=True)
class Replay:
    """What ``replay`` re-published (or would, in a dry run)."""

    saga_id: str
    event: PublishedEvent | None
    handlers: tuple[str, ...]
    sent: int


def replay(
    subscriber: ChoreographySubscriber, saga_id: str, actor: str, dry_run: bool = False
) -> Replay:
    """Re-publish the last event a subscribed handler never reacted to, to those handlers
    only; their guards keep it once."""
    events, reacted = subscriber.store.timeline(saga_id)
    if not events:
        name = subscriber.choreography.name
        raise SagaNotFoundError(f"saga {saga_id} has no {name} events")
    subscribers: dict[str, list[str]] = {}
    for s in subscriber.subscriptions:
        subscribers.setdefault(s.event, []).append(s.handler)
    awaited = awaiting_reaction(events, reacted, subscribers)
    if awaited is None:
        return Replay(saga_id, None, (), 0)
    if dry_run:
        return Replay(saga_id, awaited.event, awaited.handlers, 0)
    event = awaited.event
    note = f"replayed to {', '.join(awaited.handlers)}"
    subscriber.store.log(saga_id, event.name, note, actor, subscriber.clock())
    sent = subscriber.deliver(
        saga_id, event.name, event.event_id, event.data, only=awaited.handlers
    )
    return Replay(saga_id, event, awaited.handlers, sent)


def subscription_of(subscriber: ChoreographySubscriber, handler: str) -> Subscription:
    for subscription in subscriber.subscriptions:
        if subscription.handler == handler:
            return subscription
    raise SagaError(f"no handler {handler!r} in {subscriber.choreography.name}")


def retry_dead_letter(
    subscriber: ChoreographySubscriber,
    entry_id: int,
    saga_id: str,
    handler: str,
    event_id: str,
    actor: str,
) -> bool:
    """Re-deliver a dead handler's event to that handler (its guard keeps it once); the
    entry is resolved when the handler succeeds, dead again if it fails again. False: the
    entry was not dead (nothing done)."""
    event = subscriber.store.event(event_id)
    if event is None:
        raise SagaNotFoundError(f"event {event_id} of saga {saga_id} is not recorded")
    subscription = subscription_of(subscriber, handler)
    if not move(subscriber.store, entry_id, "retrying", subscriber.clock(), actor):
        return False
    subscriber.deliver(
        saga_id, event.name, event_id, event.data, only=[subscription.handler],
        dead_letter=entry_id,
    )  # fmt: skip
    return True


def discard_dead_letter(
    subscriber: ChoreographySubscriber, entry_id: int, actor: str, reason: str
) -> bool:
    """An operator handled it by hand. False: the entry was not dead (nothing done)."""
    return move(subscriber.store, entry_id, "discarded", subscriber.clock(), actor, reason)
