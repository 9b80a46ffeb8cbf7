"""``celery -A chaos.app``: the example app (``workers.app``) as ``--inline-steps`` runs it.

With ``CHAOS_UNTIMED_STEPS=1`` (``chaos.inline.UNTIMED_ENV``) the order saga's steps are
declared without a time limit (``timeout=None``; the default is 300 s, which keeps a step
out of inline runs) before ``workers.app`` installs it; ``SAGAS_INLINE_STEPS=true`` and
``SAGAS_STEP_TIMEOUTS`` (a case that keeps a step's timeout gives it back there) are read
by ``install`` as usual. Everything else is ``workers.app`` itself: the same settings, hooks
and participants. The default run (no ``--inline-steps``) does not use this module.

Every process of a case imports it (the worker, beat, and the case process that starts
the sagas and writes their first rows), before anything imports ``workers.app``.
"""

from __future__ import annotations

import os
import sys

from chaos.inline import UNTIMED_ENV, untimed

if os.environ.get(UNTIMED_ENV) == "1":
    if "workers.app" in sys.modules:
        raise RuntimeError(
            f"{UNTIMED_ENV}=1: chaos.app must be imported before workers.app, which "
            "installs the example sagas as they are declared when it is imported"
        )
    import workers.sagas as examples

    examples.order_fulfillment = untimed(examples.order_fulfillment)
    # the same sagas, the same length: only the order saga replaced
    examples.EXAMPLE_SAGAS = tuple(  # type: ignore[assignment]
        examples.order_fulfillment if s.name == examples.order_fulfillment.name else s
        for s in examples.EXAMPLE_SAGAS
    )

# after the order saga is settled above: workers.app installs it on import
from workers.app import app, sagas
from workers.orders import start_saga
from workers.sagas import order_fulfillment

__all__ = ["app", "order_fulfillment", "sagas", "start_saga"]
