"""``make chaos``: the fault matrix of the example order saga, on real processes.

Each case starts its own servers (a PostgreSQL cluster on port 55432 under a temporary
directory, a ``redis-server`` on port 6390, or a RabbitMQ vhost of its own), a prefork
worker and beat, starts ``--sagas`` orders while it injects one kind of fault, stops the
faults and waits for every saga to settle. Then it reads the ground truth from the
participants' own tables (payments, reservations and stock, shipments, notifications) and
the saga transition log, and prints one row per case. The machine's own services on
5432/6379/5672 are never restarted.

    python -m chaos --cases child-kill,pg-restart --brokers redis --sagas 100

``--inline-steps`` runs the same cases with the order saga's steps declared without a time
limit and ``SAGAS_INLINE_STEPS=true`` (``chaos.app``): a case whose faults are a step's time
limit keeps it (``chaos.inline``).
"""
