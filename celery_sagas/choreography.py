"""Choreography: declared events, validated at declaration time, and the pure decisions
that track a choreographed saga (which state an event moves it to, which event waits for a
reaction). No Celery, no SQL: the glue is ``integration.choreography``, the rows
``store.choreography``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from celery_sagas.definition import RetryPolicy
from celery_sagas.errors import SagaDefinitionError
from celery_sagas.machine import TERMINAL_STATES, SagaState

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
# who publishes the start and deadline events (the library itself, from the saga database)
LIBRARY_SERVICE = "celery_sagas"
# the transition log's actor of what a choreography did by itself (not an operator)
ACTOR_PREFIX = "choreography:"
EVENT_NAMESPACE = uuid.UUID("6f1c1d2e-6a57-4a8e-9c51-0c6f3b8e2a10")


def _names(value: str | Iterable[str]) -> frozenset[str]:
    return frozenset([value]) if isinstance(value, str) else frozenset(value)


@dataclass(frozen=True, init=False)
class Choreography:
    """A choreographed saga: the events it knows and what they mean for its state.

    ``start`` begins a saga; ``succeeded``/``failed`` end it; ``compensating`` events turn
    it to compensation; ``events`` are the other (forward or compensation-progress) events.
    ``deadline``: a saga not finished this long after it started is failed by beat's scan,
    which publishes ``on_deadline`` (one of the compensating or failed events).
    ``business_key``: the start data's field that names the saga (one saga per key).
    ``retry``: how a handler that raises an unexpected error is retried before it is
    dead-lettered."""

    name: str
    start: str
    succeeded: frozenset[str]
    failed: frozenset[str]
    compensating: frozenset[str] = frozenset()
    events: frozenset[str] = frozenset()
    deadline: timedelta | None = None
    on_deadline: str | None = None
    business_key: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __init__(
        self,
        name: str,
        *,
        start: str,
        succeeded: str | Iterable[str],
        failed: str | Iterable[str],
        compensating: str | Iterable[str] = (),
        events: str | Iterable[str] = (),
        deadline: timedelta | None = None,
        on_deadline: str | None = None,
        business_key: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        set_ = object.__setattr__
        set_(self, "name", name)
        set_(self, "start", start)
        set_(self, "succeeded", _names(succeeded))
        set_(self, "failed", _names(failed))
        set_(self, "compensating", _names(compensating))
        set_(self, "events", _names(events))
        set_(self, "deadline", deadline)
        set_(self, "on_deadline", on_deadline)
        set_(self, "business_key", business_key)
        set_(self, "retry", retry or RetryPolicy())
        self._validate()

    # -- validation -------------------------------------------------------------------

    def _error(self, message: str, field_name: str) -> SagaDefinitionError:
        return SagaDefinitionError(message, field=field_name, saga=self.name or None)

    def _validate(self) -> None:
        if not isinstance(self.name, str) or not NAME.match(self.name):
            raise self._error("must be a non-empty identifier (letters, digits, _ . -)", "name")
        groups = {
            "start": frozenset([self.start]),
            "succeeded": self.succeeded,
            "failed": self.failed,
            "compensating": self.compensating,
            "events": self.events,
        }
        for group, names in groups.items():
            for event in names:
                if not isinstance(event, str) or not NAME.match(event):
                    raise self._error(f"{event!r} is not a valid event name", group)
        for group in ("succeeded", "failed"):
            if not groups[group]:
                raise self._error("declare at least one event", group)
        seen: dict[str, str] = {}
        for group, names in groups.items():
            for event in sorted(names):
                if event in seen:
                    raise self._error(f"{event!r} is also declared in {seen[event]}", group)
                seen[event] = group
        self._validate_deadline()

    def _validate_deadline(self) -> None:
        if self.deadline is not None and self.deadline <= timedelta(0):
            raise self._error("must be positive", "deadline")
        if (self.deadline is None) != (self.on_deadline is None):
            raise self._error("deadline and on_deadline go together", "on_deadline")
        if self.on_deadline is not None and self.on_deadline not in (
            self.compensating | self.failed
        ):
            raise self._error(
                f"{self.on_deadline!r} must be one of the compensating or failed events",
                "on_deadline",
            )

    # -- reading ----------------------------------------------------------------------

    @property
    def known(self) -> frozenset[str]:
        """Every event this choreography declares."""
        return (
            frozenset([self.start]) | self.succeeded | self.failed | self.compensating | self.events
        )

    def check_event(self, event: str, field_name: str = "event") -> str:
        """``event`` if declared, else a ``SagaDefinitionError`` naming the known ones."""
        if event not in self.known:
            raise self._error(
                f"unknown event {event!r}; declared: {sorted(self.known)}", field_name
            )
        return event

    def handler_task_name(self, service: str, handler: str) -> str:
        """The stable Celery task name of a handler: ``order_choreography.payment.charge``."""
        return f"{self.name}.{service}.{handler}"

    def deadline_at(
        self, started_at: datetime, override: timedelta | None = None
    ) -> datetime | None:
        deadline = override or self.deadline
        return None if deadline is None else started_at + deadline


# -- pure decisions ---------------------------------------------------------------------


def track(choreography: Choreography, state: SagaState | None, event: str) -> SagaState:
    """The saga's state after ``event`` was published (pure).

    The start event starts it; a failed event fails it, a succeeded one completes it
    (unless it is compensating: a late success does not undo a compensation); a
    compensating event turns it to COMPENSATING; any other event means it is in progress
    (PENDING), or still compensating. A finished saga stays as it is."""
    if state in TERMINAL_STATES:
        assert state is not None
        return state
    if event in choreography.failed:
        return SagaState.FAILED
    if event in choreography.compensating or state == SagaState.COMPENSATING:
        return SagaState.COMPENSATING
    if event in choreography.succeeded:
        return SagaState.COMPLETED
    if event == choreography.start and state is None:
        return SagaState.STARTED
    return SagaState.PENDING


@dataclass(frozen=True)
class PublishedEvent:
    """One event of a saga's timeline, as the saga database recorded it."""

    event_id: str
    saga_id: str
    name: str
    service: str
    data: Mapping[str, Any]
    published_at: datetime
    handler: str | None = None  # the handler that published it (None: the library)
    caused_by: str | None = None  # the event that handler consumed


@dataclass(frozen=True)
class OutgoingEvent:
    """An event a handler (or the library) publishes, as its outbox row holds it."""

    event_id: str
    saga_id: str
    name: str
    service: str
    data: Mapping[str, Any]
    handler: str | None = None
    caused_by: str | None = None
    id: int | None = None  # the outbox row, once written


@dataclass(frozen=True)
class Reaction:
    """What a handler's transaction committed: ``ok``, ``business`` (the declared failure
    event instead of its work) or ``duplicate`` (its guard was there: nothing changed);
    the events to relay (for a duplicate, those its first run left unsent)."""

    outcome: str
    events: tuple[OutgoingEvent, ...] = ()
    recorded: str | None = None  # a duplicate: the outcome its first run recorded


@dataclass(frozen=True)
class Awaited:
    """An event some subscribers never reacted to, and which ones."""

    event: PublishedEvent
    handlers: tuple[str, ...]


def awaiting_reaction(
    events: Sequence[PublishedEvent],
    reacted: Iterable[tuple[str, str]],
    subscribers: Mapping[str, Sequence[str]],
) -> Awaited | None:
    """The last event (in publication order) with a subscriber that recorded no
    reaction to it, and those subscribers (pure). ``reacted``: (event_id, handler) pairs;
    ``subscribers``: event name -> handler names."""
    done = set(reacted)
    for event in reversed(events):
        missing = tuple(
            h for h in subscribers.get(event.name, ()) if (event.event_id, h) not in done
        )
        if missing:
            return Awaited(event, missing)
    return None


def deadline_event_id(saga_id: str) -> str:
    """The deadline event's id: one per saga, so the scan publishes it once."""
    return str(uuid.uuid5(EVENT_NAMESPACE, f"{saga_id}:deadline"))


def start_event_id(saga_id: str) -> str:
    return str(uuid.uuid5(EVENT_NAMESPACE, f"{saga_id}:start"))


def dead_letter_step(handler: str, event_id: str) -> int:
    """The dead-letter row's ``step`` for a choreography handler: negative (orchestrated
    steps count from 0) and stable per handler and event."""
    digest = uuid.uuid5(EVENT_NAMESPACE, f"{handler}:{event_id}").int
    return -1 - digest % (2**31 - 2)


def automatic_actor(who: str) -> str:
    """The transition log's actor for a handler (or the library) acting on its own."""
    return f"{ACTOR_PREFIX}{who}"


def by_operator(actor: str) -> bool:
    """A transition a person made (cancel, DLQ retry/discard, replay), not the coordinator
    or a choreography acting on its own."""
    return actor != "coordinator" and not actor.startswith(ACTOR_PREFIX)


def is_handler_dead_letter(step: int) -> bool:
    """A dead-letter row of a choreography handler (not of a compensation)."""
    return step < 0


def reaction_key(saga_id: str, handler: str, event_id: str) -> str:
    """The idempotency key of one handler's reaction to one event (attempt rows)."""
    return f"{saga_id}:{handler}:{event_id}"
