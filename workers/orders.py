"""What application code imports: ``from workers.orders import start_saga``.

``start_saga.delay(order)`` checks the order in the caller (a bad order raises
``InvalidPayloadError`` and nothing is sent or written), then starts one saga per
``order_id``.
"""

from __future__ import annotations

from workers.app import sagas

start_saga = sagas.start_task("order_fulfillment")

__all__ = ["start_saga"]
