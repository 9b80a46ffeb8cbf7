"""Two choreographies on one app and one saga database (services keep their guard and
outbox there too): each relay publishes only its own choreography's unsent events. A relay
that took the other's events would find no handler of its own for them, mark them sent,
and the other choreography would never deliver them (committed work, lost event)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
from celery import Celery

from celery_sagas import Choreography, choreography_subscriber
from celery_sagas.choreography import OutgoingEvent, start_event_id
from celery_sagas.coordinator import utcnow
from celery_sagas.store import upgrade
from celery_sagas.store.choreography import NewChoreographedSaga
from celery_sagas.store.service_outbox import create_service_tables
from tests.conftest import require_service
from tests.support.databases import create_pg_database, drop_pg_database

pytestmark = pytest.mark.integration

ALPHA = Choreography("alpha_flow", start="AlphaOpened", succeeded="AlphaDone", failed="AlphaLost")
BETA = Choreography(
    "beta_flow", start="BetaOpened", events={"BetaBooked"}, succeeded="BetaDone", failed="BetaLost"
)


def nothing(event: Any, tx: Any) -> None:
    """A handler the tests never run: only the messages sent to its queue matter."""


@pytest.fixture(scope="module")
def saga_url() -> Iterator[str]:
    require_service("postgresql")
    url = create_pg_database("choreo_two")
    upgrade(url)
    create_service_tables(url)
    yield url
    drop_pg_database(url)


@pytest.fixture
def pair(saga_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    monkeypatch.setenv("CELERY_BROKER_URL", redis_url)  # Celery prefers it to broker=
    app = Celery(f"two-{uuid.uuid4().hex[:6]}", broker=redis_url)
    alpha = choreography_subscriber(app, ALPHA, database_url=saga_url)
    beta = choreography_subscriber(app, BETA, database_url=saga_url)
    alpha("AlphaOpened", service="alpha_svc")(nothing)
    beta("BetaOpened", service="beta_open")(nothing)
    beta("BetaBooked", service="beta_book")(nothing)
    return alpha, beta


def relay_later(subscriber: Any) -> int:
    """Run the relay as if its ``relay_after`` had passed."""
    subscriber.clock = lambda: utcnow() + timedelta(minutes=1)
    try:
        return int(subscriber.relay())
    finally:
        subscriber.clock = utcnow


def unsent_library_events(subscriber: Any) -> set[str]:
    later = utcnow() + timedelta(minutes=1)
    return {e.event_id for e in subscriber.store.unsent(subscriber.choreography.name, later, 100)}


def unsent_outbox_rows(outbox: Any) -> set[str]:
    return {e.event_id for e in outbox.unsent(utcnow() + timedelta(minutes=1), 100)}


def queued(redis_url: str, queue: str) -> int:
    return int(redis.Redis.from_url(redis_url).llen(queue))


def test_a_relay_leaves_the_other_choreographys_start_event_to_its_own_relay(
    pair: tuple[Any, Any], redis_url: str
) -> None:
    alpha, beta = pair
    saga_id = str(uuid.uuid4())
    now = beta.clock()
    new = NewChoreographedSaga(saga_id, BETA.name, saga_id, {}, "h", None)
    start = OutgoingEvent(start_event_id(saga_id), saga_id, BETA.start, "celery_sagas", {})
    beta.store.start(BETA, new, start, now)  # committed; its publisher died before publishing

    relay_later(alpha)
    assert start.event_id in unsent_library_events(beta)
    relay_later(beta)
    assert start.event_id not in unsent_library_events(beta)
    assert queued(redis_url, "beta_open") == 1


def test_a_relay_leaves_the_other_choreographys_service_outbox_rows_to_its_own_relay(
    pair: tuple[Any, Any], redis_url: str
) -> None:
    alpha, beta = pair
    saga_id = beta.start({"n": 1})
    assert queued(redis_url, "beta_open") == 1
    booked = OutgoingEvent(
        str(uuid.uuid4()), saga_id, "BetaBooked", "beta_open", {"n": 1}, "beta_open.nothing",
        start_event_id(saga_id),
    )  # fmt: skip
    outbox = beta.service_outbox("beta_open")
    # the handler committed its work and outbox row, then its worker died before publishing
    outbox.react(saga_id, "beta_open.nothing", start_event_id(saga_id),
                 lambda tx: [booked], None, (), beta.clock())  # fmt: skip

    relay_later(alpha)
    assert booked.event_id in unsent_outbox_rows(outbox)
    events, _ = beta.store.timeline(saga_id)
    assert [e.name for e in events] == ["BetaOpened"]  # alpha did not track beta's saga
    relay_later(beta)
    assert booked.event_id not in unsent_outbox_rows(outbox)
    assert queued(redis_url, "beta_book") == 1
    assert beta.saga_store.load(saga_id).state.value == "PENDING"
