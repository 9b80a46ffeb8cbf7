"""What application code imports: ``from workers.bank_transfers import start_transfer``.

``handle = start_transfer.delay({"transfer_id": "TR-1", "source": "ACC-1",
"target": "ACC-2", "amount": 2500})`` checks the transfer in the caller
(``InvalidPayloadError`` for a bad one: nothing written or sent), commits the saga (one per
``transfer_id``) with its first step's outbox row, publishes the step and returns a handle,
like ``workers.orders.start_saga``.
"""

from __future__ import annotations

from workers.app import sagas

start_transfer = sagas.start_task("bank_transfer")

__all__ = ["start_transfer"]
