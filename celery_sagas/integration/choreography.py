"""Choreography on a Celery app: ``on = choreography_subscriber(app, choreography, …)``,
then ``@on("InventoryReserved", service="payment", on_business_error="PaymentFailed")``.

Each handler is an ordinary Celery task named ``<choreography>.<service>.<function>`` on
its service's queue (durable: a stopped service's events wait for it), late acks, json.
Publishing an event sends one message per subscribed handler. Beat relays what was left
unsent (service outboxes and the library's own events) and fails sagas past their
deadline by publishing ``on_deadline``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from celery import Celery, Task, signals

from celery_sagas.choreography import (
    LIBRARY_SERVICE,
    Choreography,
    OutgoingEvent,
    PublishedEvent,
    start_event_id,
)
from celery_sagas.coordinator import payload_hash, utcnow
from celery_sagas.errors import BusinessError, InvalidPayloadError, SagaError
from celery_sagas.integration.config import SAGA_TASK_OPTIONS, add_routes, check_app
from celery_sagas.integration.quiet import quiet_periodic_tasks
from celery_sagas.integration.reactions import (
    Delivery,
    Handler,
    Retry,
    Subscription,
    react,
)
from celery_sagas.integration.runtime import _consume_by_default as consume_by_default
from celery_sagas.log import logger
from celery_sagas.redaction import redact
from celery_sagas.settings import SagaSettings
from celery_sagas.store import SqlSagaStore, dispose_all_after_fork
from celery_sagas.store.choreography import ChoreographyStore, NewChoreographedSaga
from celery_sagas.store.service_outbox import ServiceOutbox
from celery_sagas.store.timeline_rows import Consumed

REGISTRY_ATTR = "_celery_sagas_choreographies"

# an event to deliver: a service's outbox row or one the library publishes
E = TypeVar("E", OutgoingEvent, PublishedEvent)


class ChoreographySubscriber:
    """The subscriptions of one choreography on one Celery app; see the module docstring.

    ``database_url``: the saga database (tracking); ``service_databases``: each service's
    own database (its guard and outbox tables, ``create_service_tables``), the saga
    database for a service not named. Other keyword arguments are ``SagaSettings``
    (``relay_interval``, ``scan_interval``, ``relay_after``, ``redact_fields``…)."""

    def __init__(
        self,
        app: Celery,
        choreography: Choreography,
        service_databases: Mapping[str, str] | None = None,
        **settings: Any,
    ) -> None:
        self.app = app
        self.choreography = choreography
        self.settings = SagaSettings.from_config(app.conf, **settings)
        self.service_databases = dict(service_databases or {})
        self.subscriptions: list[Subscription] = []
        self.redact_fields = tuple(self.settings.redact_fields)
        self.clock = utcnow
        self._store: ChoreographyStore | None = None
        self._saga_store: SqlSagaStore | None = None
        self._outboxes: dict[str, ServiceOutbox] = {}

    # -- stores ---------------------------------------------------------------------

    @property
    def store(self) -> ChoreographyStore:
        if self._store is None:
            self._store = ChoreographyStore(
                self.settings.database_url, prepare=self.settings.prepared_statements
            )
        return self._store

    @property
    def saga_store(self) -> SqlSagaStore:
        if self._saga_store is None:
            self._saga_store = SqlSagaStore(
                self.settings.database_url, prepare=self.settings.prepared_statements
            )
        return self._saga_store

    def service_url(self, service: str) -> str:
        return self.service_databases.get(service) or self.settings.database_url

    def service_outbox(self, service: str) -> ServiceOutbox:
        url = self.service_url(service)
        if url not in self._outboxes:
            self._outboxes[url] = ServiceOutbox(url, prepare=self.settings.prepared_statements)
        return self._outboxes[url]

    # -- declaring handlers -----------------------------------------------------------

    def __call__(
        self,
        event: str,
        *,
        service: str,
        on_business_error: str | None = None,
        business_errors: Iterable[type[BaseException]] = (BusinessError,),
        queue: str | None = None,
    ) -> Callable[[Handler], Task]:
        """Subscribe the decorated ``handler(event, tx)`` to ``event``; ``tx`` is the
        service database's transaction. ``on_business_error``: the event published (with
        the data and a ``reason``) when it raises one of ``business_errors``."""
        self.choreography.check_event(event)
        if on_business_error is not None:
            self.choreography.check_event(on_business_error, "on_business_error")

        def register(function: Handler) -> Task:
            subscription = Subscription(
                event=event,
                service=service,
                function=function,
                task_name=self.choreography.handler_task_name(service, function.__name__),
                queue=queue or service,
                on_business_error=on_business_error,
                business_errors=tuple(business_errors),
            )
            if any(s.task_name == subscription.task_name for s in self.subscriptions):
                raise SagaError(f"handler {subscription.task_name} is already subscribed")
            self.subscriptions.append(subscription)
            return self._register_task(subscription)

        return register

    def _register_task(self, subscription: Subscription) -> Task:
        subscriber = self

        def run(
            self: Task,
            saga_id: str,
            event: str,
            event_id: str,
            data: Any,
            dead_letter: int | None = None,
        ) -> str:
            delivery = Delivery(saga_id, event, event_id, data or {}, dead_letter)
            outcome = react(subscriber, subscription, delivery, self.request.retries + 1)
            if isinstance(outcome, Retry):
                raise self.retry(countdown=outcome.delay, exc=RuntimeError(outcome.error))
            return outcome

        run.__name__ = subscription.function.__name__
        run.__doc__ = subscription.function.__doc__
        task: Task = self.app.task(
            name=subscription.task_name,
            bind=True,
            shared=False,
            ignore_result=True,
            max_retries=None,  # the choreography's retry policy decides
            **SAGA_TASK_OPTIONS,  # late acks, redelivery on a lost child, json
        )(run)
        add_routes(self.app, {subscription.task_name: {"queue": subscription.queue}})
        # a worker without -Q (one node) serves every service; a service's own workers
        # consume its queue: -Q payment
        consume_by_default(self.app, subscription.queue)
        return task

    def handlers_of(self, event: str) -> tuple[Subscription, ...]:
        return tuple(s for s in self.subscriptions if s.event == event)

    # -- publishing -------------------------------------------------------------------

    def deliver(
        self,
        saga_id: str,
        name: str,
        event_id: str,
        data: Mapping[str, Any],
        only: Iterable[str] | None = None,
        dead_letter: int | None = None,
    ) -> int:
        """One message per subscribed handler (``only``: these handlers)."""
        wanted = None if only is None else set(only)
        sent = 0
        for subscription in self.handlers_of(name):
            if wanted is not None and subscription.handler not in wanted:
                continue
            kwargs: dict[str, Any] = {
                "saga_id": saga_id,
                "event": name,
                "event_id": event_id,
                "data": dict(data),
            }
            if dead_letter is not None:
                kwargs["dead_letter"] = dead_letter
            self.app.send_task(
                subscription.task_name,
                kwargs=kwargs,
                queue=subscription.queue,
                root_id=saga_id,
                ignore_result=True,
                serializer="json",
                kwargsrepr=repr({**kwargs, "data": redact(kwargs["data"], self.redact_fields)}),
            )
            sent += 1
        terminal = self.choreography.succeeded | self.choreography.failed
        if not sent and wanted is None and name not in terminal:
            logger.info(
                "saga %s: no handler subscribed to %s",
                saga_id,
                name,
                extra={"saga_id": saga_id, "saga": self.choreography.name},
            )
        return sent

    def publish_service_events(self, service: str, events: Sequence[OutgoingEvent]) -> int:
        """Deliver committed outbox rows of ``service`` and mark them sent; a failed
        delivery stays for the relay."""
        delivered = self._deliver_each(events)
        sent = [event.id for event in delivered if event.id is not None]
        self.service_outbox(service).mark_sent(sent, self.clock())
        return len(sent)

    def publish_library_events(self, events: Sequence[PublishedEvent]) -> int:
        """Deliver the start and deadline events and mark them sent (the same rule)."""
        sent = [event.event_id for event in self._deliver_each(events)]
        self.store.mark_sent(sent, self.clock())
        return len(sent)

    def _deliver_each(self, events: Sequence[E]) -> list[E]:
        """The events whose delivery succeeded; a failure is logged and left unsent."""
        delivered: list[E] = []
        for event in events:
            try:
                self.deliver(event.saga_id, event.name, event.event_id, event.data)
            except Exception:
                logger.exception(
                    "publish of %s for saga %s failed; the relay will retry",
                    event.name,
                    event.saga_id,
                    extra={"saga_id": event.saga_id},
                )
                continue
            delivered.append(event)
        return delivered

    # -- starting ---------------------------------------------------------------------

    def start(
        self,
        data: Mapping[str, Any],
        *,
        saga_id: str | None = None,
        deadline: timedelta | None = None,
    ) -> str:
        """Start a saga: its row and the start event committed, then published (the
        relay publishes it if this publish fails). Returns the saga id; a saga already
        started for the business key is returned as it is."""
        choreography = self.choreography
        payload = dict(data)
        key_field = choreography.business_key
        if key_field is not None and key_field not in payload:
            raise InvalidPayloadError(f"{choreography.name}: the start data has no {key_field!r}")
        saga_id = saga_id or str(uuid.uuid4())
        now = self.clock()
        new = NewChoreographedSaga(
            saga_id=saga_id,
            name=choreography.name,
            business_key=str(payload[key_field]) if key_field else saga_id,
            payload=payload,
            payload_hash=payload_hash(payload),
            deadline_at=choreography.deadline_at(now, deadline),
        )
        event = OutgoingEvent(
            start_event_id(saga_id), saga_id, choreography.start, LIBRARY_SERVICE, payload
        )
        found, created = self.store.start(choreography, new, event, now)
        if created:
            published = PublishedEvent(
                event.event_id, saga_id, event.name, event.service, payload, now
            )
            self.publish_library_events([published])
        return found

    # -- beat -------------------------------------------------------------------------

    def relay(self) -> int:
        """Publish what was left unsent: the library's events and every service outbox."""
        before = self.clock() - timedelta(seconds=self.settings.relay_after)
        batch = self.settings.relay_batch
        name = self.choreography.name
        count = self.publish_library_events(self.store.unsent(name, before, batch))
        services = {s.service for s in self.subscriptions}
        by_url: dict[str, str] = {self.service_url(s): s for s in sorted(services)}
        for service in by_url.values():
            # a service database may hold other choreographies' outboxes: theirs to relay
            pending = self.service_outbox(service).unsent(before, batch)
            mine = self.store.sagas_of(name, (e.saga_id for e in pending))
            pending = tuple(e for e in pending if e.saga_id in mine)
            if pending:
                logger.warning("relaying %d unsent event(s) of %s", len(pending), service)
            for event in pending:  # timeline first (idempotent): its handler may have died
                consumed = self._consumed_by(service, event)
                self.store.record(self.choreography, event.saga_id, consumed, [event], self.clock())
            count += self.publish_service_events(service, pending)
        return count

    def _consumed_by(self, service: str, event: OutgoingEvent) -> Consumed | None:
        """The reaction that published ``event``, as its service's guard recorded it (a
        handler that died before the saga database's transaction left it unrecorded)."""
        if event.caused_by is None or event.handler is None:
            return None
        outcome = self.service_outbox(service).reacted(event.caused_by, event.handler)
        cause = self.store.event(event.caused_by) if outcome else None
        if outcome is None or cause is None:
            return None
        return Consumed(event.caused_by, event.handler, cause.name, outcome)

    def scan(self) -> int:
        """Fail sagas past their deadline (their ``on_deadline`` event, published now)."""
        fired = self.store.fail_overdue(self.choreography, self.clock(), self.settings.scan_batch)
        for event in fired:
            logger.warning(
                "saga %s (%s) passed its deadline: %s published",
                event.saga_id,
                self.choreography.name,
                event.name,
                extra={"saga_id": event.saga_id, "reason": "deadline"},
            )
        self.publish_library_events(fired)
        return len(fired)


def choreography_subscriber(
    app: Celery,
    choreography: Choreography,
    service_databases: Mapping[str, str] | None = None,
    **settings: Any,
) -> ChoreographySubscriber:
    """Wire ``choreography`` into ``app``; returns the decorator that subscribes handlers
    (see ``ChoreographySubscriber``). Registers the relay and the deadline scan on beat."""
    subscriber = ChoreographySubscriber(app, choreography, service_databases, **settings)
    check_app(app, ())
    name = choreography.name
    relay_name, scan_name = f"{name}.relay", f"{name}.scan"

    @app.task(name=relay_name, shared=False, ignore_result=True, expires=30, **SAGA_TASK_OPTIONS)
    def relay() -> int:
        return subscriber.relay()

    @app.task(name=scan_name, shared=False, ignore_result=True, expires=30, **SAGA_TASK_OPTIONS)
    def scan() -> int:
        return subscriber.scan()

    app.conf.beat_schedule = {
        **(app.conf.beat_schedule or {}),
        relay_name: {"task": relay_name, "schedule": subscriber.settings.relay_interval},
        scan_name: {"task": scan_name, "schedule": subscriber.settings.scan_interval},
    }
    control = subscriber.settings.control_queue
    if control and control in {q.name for q in (app.conf.task_queues or ())}:
        add_routes(app, {relay_name: {"queue": control}, scan_name: {"queue": control}})
    quiet_periodic_tasks((relay_name, scan_name))
    signals.worker_process_init.connect(_dispose_engines, weak=False)
    registry: dict[str, ChoreographySubscriber] = getattr(app, REGISTRY_ATTR, {})
    registry[name] = subscriber
    setattr(app, REGISTRY_ATTR, registry)
    return subscriber


def choreographies(app: Any) -> Mapping[str, ChoreographySubscriber]:
    """The choreographies wired into ``app`` (for the CLI)."""
    return dict(getattr(app, REGISTRY_ATTR, {}))


def _dispose_engines(**_: Any) -> None:
    dispose_all_after_fork()
