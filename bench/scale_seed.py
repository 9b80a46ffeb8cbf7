"""Seeding N finished sagas set-based (``INSERT … SELECT generate_series``), shaped as a real
4-step run of ``order_fulfillment`` leaves them (checked against the in-memory store:
4 steps, 11 transitions, 4 guards, 4 outbox rows), plus ``LIVE`` sagas still moving."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from celery_sagas.definition import Saga, Step

STEP_NAMES = ("reserve_inventory", "process_payment", "create_shipment", "send_confirmation")
LIVE = 20
HISTORY = timedelta(days=100)


def _noop(ctx: object) -> None:
    return None


SAGA = Saga(
    "order_fulfillment",
    [Step(name, _noop, _noop, compensation_name=f"undo_{name}") for name in STEP_NAMES],
    business_key="order_id",
)

_STEPS = ", ".join(f"({i}, '{name}')" for i, name in enumerate(STEP_NAMES))
# the transition log of a completed run, in order: (n, step index or NULL, old, new)
_COMPLETED_LOG = [(0, None, "-", "STARTED")]
for _i in range(4):
    _COMPLETED_LOG += [(len(_COMPLETED_LOG), _i, "pending", "running")]
    _COMPLETED_LOG += [(len(_COMPLETED_LOG), _i, "running", "completed")]
    if _i == 0:
        _COMPLETED_LOG += [(len(_COMPLETED_LOG), None, "STARTED", "PENDING")]
_COMPLETED_LOG += [(len(_COMPLETED_LOG), None, "PENDING", "COMPLETED")]
_LOG = ", ".join(
    f"({n}, {'NULL' if s is None else s}, '{old}', '{new}')" for n, s, old, new in _COMPLETED_LOG
)

STATEMENTS = [
    # one row per saga: i, id, created_at, failed
    """
    CREATE UNLOGGED TABLE seed AS
    SELECT i,
           md5('saga' || i)::uuid::text AS id,
           CAST(:start AS timestamptz) + (i::bigint * :spacing_us) * interval '1 microsecond' AS at,
           i % 10 = 0 AS failed
    FROM generate_series(1, :n) AS i
    """,
    """
    INSERT INTO saga (id, name, business_key, payload, payload_hash, state, current_step,
                      token, version, reason, created_at, updated_at, finished_at, admitted,
                      definition)
    SELECT id, 'order_fulfillment', 'K-' || i,
           json_build_object('order_id', 'K-' || i,
                             'items', json_build_array(json_build_object(
                                 'sku', 'WIDGET', 'qty', 2, 'price', 1250)),
                             'payment', json_build_object('method', 'card')),
           md5(id),
           CASE WHEN failed THEN 'FAILED' ELSE 'COMPLETED' END, 3, 4, 5,
           CASE WHEN failed THEN 'create_shipment failed: BusinessError: no stock' END,
           at, at + interval '80 ms', at + interval '80 ms', true, :definition
    FROM seed
    """,
    f"""
    INSERT INTO saga_step (saga_id, idx, name, status, attempts, compensation_attempts,
                           result, error, error_kind, started_at, finished_at,
                           compensation_started_at, compensation_finished_at, dispatches)
    SELECT id, s.idx, s.name,
           CASE WHEN NOT failed THEN 'completed'
                WHEN s.idx < 2 THEN 'compensated'
                WHEN s.idx = 2 THEN 'failed' ELSE 'skipped' END,
           CASE WHEN failed AND s.idx = 3 THEN 0 ELSE 1 END,
           CASE WHEN failed AND s.idx < 2 THEN 1 ELSE 0 END,
           CASE WHEN failed AND s.idx >= 2 THEN NULL
                ELSE json_build_object('id', s.name || '-' || i) END,
           CASE WHEN failed AND s.idx = 2 THEN 'BusinessError: no stock' END,
           CASE WHEN failed AND s.idx = 2 THEN 'business' END,
           at + s.idx * interval '20 ms', at + (s.idx + 1) * interval '20 ms',
           CASE WHEN failed AND s.idx < 2 THEN at + interval '70 ms' END,
           CASE WHEN failed AND s.idx < 2 THEN at + interval '75 ms' END,
           CASE WHEN failed AND s.idx = 3 THEN 0 ELSE 1 END
    FROM seed CROSS JOIN (VALUES {_STEPS}) AS s(idx, name)
    """,
    f"""
    INSERT INTO saga_transition (saga_id, at, step, old, new, reason, actor)
    SELECT id, at + l.n * interval '7 ms',
           (ARRAY[{", ".join(f"'{n}'" for n in STEP_NAMES)}])[l.step + 1],
           l.old, l.new, NULL, 'coordinator'
    FROM seed CROSS JOIN (VALUES {_LOG}) AS l(n, step, old, new)
    ORDER BY seed.i, l.n
    """,
    f"""
    INSERT INTO saga_guard (key, outcome, result, error, recorded_at)
    SELECT id || ':' || s.name || ':' || 'action', 'ok',
           json_build_object('id', s.name || '-' || i), NULL, at + (s.idx + 1) * interval '20 ms'
    FROM seed CROSS JOIN (VALUES {_STEPS}) AS s(idx, name)
    """,
    f"""
    INSERT INTO saga_outbox (saga_id, body, created_at, sent_at, key)
    SELECT id,
           json_build_object('kind', 'action', 'saga', 'order_fulfillment', 'saga_id', id,
                             'step', s.idx, 'step_name', s.name, 'token', s.idx + 1,
                             'key', id || ':' || s.name || ':' || 'action',
                             'definition', CAST(:definition AS text)),
           at + s.idx * interval '20 ms', at + (s.idx + 1) * interval '20 ms',
           id || ':' || s.name || ':' || 'action'
    FROM seed CROSS JOIN (VALUES {_STEPS}) AS s(idx, name)
    ORDER BY seed.i, s.idx
    """,
    # one in a thousand: its refund died twice, an operator retried it (resolved)
    """
    INSERT INTO saga_dead_letter (saga_id, saga_name, step, step_name, task_name, status,
                                  attempts, deaths, error, payload, created_at, updated_at,
                                  resolved_at, resolution)
    SELECT id, 'order_fulfillment', 1, 'process_payment',
           'order_fulfillment.undo_process_payment', 'resolved', 2, 1,
           'ConnectionError: refund API down', json_build_object('order_id', 'K-' || i),
           at + interval '70 ms', at + interval '75 ms', at + interval '75 ms', 'retried by alice'
    FROM seed WHERE i % 1000 = 0
    """,
    """
    INSERT INTO saga_attempt (saga_id, key, attempt, at, error)
    SELECT id, id || ':' || 'process_payment' || ':' || 'compensation', a, at + interval '70 ms',
           'ConnectionError: refund API down'
    FROM seed CROSS JOIN generate_series(1, 2) AS a WHERE i % 1000 = 0
    """,
    "DROP TABLE seed",
]

LIVE_STATEMENTS = [
    """
    INSERT INTO saga (id, name, business_key, payload, payload_hash, state, current_step,
                      token, version, created_at, updated_at, due_at, admitted, definition)
    SELECT 'live-' || i, 'order_fulfillment', 'L-' || i,
           json_build_object('order_id', 'L-' || i), md5('live' || i), 'PENDING', 1, 2, 3,
           :now - interval '1 minute', :now - interval '1 minute', :now + interval '1 day',
           true, :definition
    FROM generate_series(1, :live) AS i
    """,
    f"""
    INSERT INTO saga_step (saga_id, idx, name, status, attempts, started_at, dispatches)
    SELECT 'live-' || i, s.idx, s.name,
           CASE WHEN s.idx = 0 THEN 'completed' WHEN s.idx = 1 THEN 'running'
                ELSE 'pending' END,
           CASE WHEN s.idx < 2 THEN 1 ELSE 0 END,
           CASE WHEN s.idx < 2 THEN :now - interval '1 minute' END,
           CASE WHEN s.idx < 2 THEN 1 ELSE 0 END
    FROM generate_series(1, :live) AS i CROSS JOIN (VALUES {_STEPS}) AS s(idx, name)
    """,
    # the message of its current step was never published: the relay's work
    """
    INSERT INTO saga_outbox (saga_id, body, created_at, key)
    SELECT 'live-' || i,
           json_build_object('kind', 'action', 'saga', 'order_fulfillment',
                             'saga_id', 'live-' || i, 'step', 1, 'token', 2,
                             'key', 'live-' || i || ':' || 'process_payment' || ':' || 'action'),
           :now - interval '1 minute', 'live-' || i || ':' || 'process_payment' || ':' || 'action'
    FROM generate_series(1, :live) AS i
    """,
]


def seed(engine: sa.Engine, n: int) -> None:
    """``n`` finished sagas created over the last ``HISTORY``, oldest first, and ``LIVE``
    live ones (one transaction)."""
    now = datetime.now(UTC)
    start = now - HISTORY - timedelta(hours=1)
    params = {
        "n": n,
        "start": start,
        "spacing_us": int(HISTORY.total_seconds() * 1e6 / n),
        "definition": SAGA.fingerprint,
        "now": now,
        "live": LIVE,
    }
    with engine.begin() as conn:
        for statement in [*STATEMENTS, *LIVE_STATEMENTS]:
            text = sa.text(statement)
            names = set(text.compile().params)
            conn.execute(text, {k: v for k, v in params.items() if k in names})
