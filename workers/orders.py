"""What application code imports: ``from workers.orders import start_saga``.

``handle = start_saga.delay(order)`` checks the order in the caller (a bad order raises
``InvalidPayloadError`` and nothing is written or sent), commits the saga (one per
``order_id``) and its first step's outbox row, publishes the step, and returns a handle:
``handle.saga_id``, ``handle.state()``, ``handle.wait(timeout=30)``. Pass
``connection=`` (a SQLAlchemy ``Connection`` or ``Session``) to start it inside your own
transaction; ``start_saga.enqueue(order)`` is the message-only start.
"""

from __future__ import annotations

from workers.app import sagas

start_saga = sagas.start_task("order_fulfillment")

__all__ = ["start_saga"]
