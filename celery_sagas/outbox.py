"""Publishing after commit, and the relay that republishes what was not marked sent."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from celery_sagas.log import logger
from celery_sagas.protocols import Dispatcher, OutboxMessage, OutboxStore


def publish(
    store: OutboxStore,
    dispatcher: Dispatcher,
    messages: Sequence[OutboxMessage],
    now: Callable[[], datetime],
    relayed: bool = False,
) -> int:
    """Publish committed outbox messages. Step messages need no "sent" mark: the saga's
    next transition marks them (one transaction fewer per hop). Other messages (DLQ) are
    marked here. A failed publish leaves the row for the relay; returns how many were
    sent."""
    sent: list[int] = []
    for message in messages:
        try:
            dispatcher.send(message)
        except Exception:
            logger.exception(
                "publish of outbox message %s for saga %s failed; the relay will retry",
                message.id,
                message.saga_id,
                extra={"saga_id": message.saga_id},
            )
            continue
        if message.id is not None:
            sent.append(message.id)
    marked = [m.id for m in messages if m.id in sent and (relayed or not m.body.get("key"))]
    store.mark_sent([i for i in marked if i is not None], now())
    return len(sent)


def relay(
    store: OutboxStore,
    dispatcher: Dispatcher,
    now: Callable[[], datetime],
    older_than: float,
    batch: int,
) -> int:
    """Republish outbox rows left unsent for more than ``older_than`` seconds (a worker
    died between commit and publish). Duplicates are harmless: handlers are idempotent."""
    pending = store.unsent(now() - timedelta(seconds=older_than), batch)
    if pending:
        logger.warning("relaying %d unsent outbox message(s)", len(pending))
    return publish(store, dispatcher, pending, now, relayed=True)
