"""The faults: when each case injects them, and how.

``Case.times(duration, quick)`` gives the moments (seconds into the fault window) and
``Case.inject(run, tick)`` injects one round, returning how many faults it injected.
Cases whose faults ride in the orders themselves (hung participants, late replies) or in
the deployment (two beats) have no moments; the orders or processes are counted instead.
"""

from __future__ import annotations

import os
import pickle
import signal
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

if TYPE_CHECKING:
    from chaos.case import Run

STEPS = ("reserve_inventory", "process_payment", "create_shipment", "send_confirmation")
REPLAYS = 1000
REPLAYS_QUICK = 200


def every(
    seconds: float, quick_seconds: float | None = None
) -> Callable[[float, bool], list[float]]:
    def times(duration: float, quick: bool) -> list[float]:
        step = quick_seconds if quick and quick_seconds else seconds
        moments, at = [], step
        while at < duration:
            moments.append(at)
            at += step
        return moments

    return times


def at_fractions(*fractions: float) -> Callable[[float, bool], list[float]]:
    return lambda duration, quick: [duration * f for f in fractions]


def never(duration: float, quick: bool) -> list[float]:
    return []


# --- processes --------------------------------------------------------------------------


def kill_pool_child(run: Run, tick: int) -> int:
    children = run.worker.child_pids()
    if not children:
        return 0
    os.kill(run.rng.choice(children), signal.SIGKILL)
    return 1


def kill_worker(run: Run, tick: int) -> int:
    run.supervisor.kill_and_restart(run.worker)
    return 1


# --- servers ----------------------------------------------------------------------------


def restart_postgres(run: Run, tick: int) -> int:
    run.pg.restart_immediate()
    return 1


def restart_broker(run: Run, tick: int) -> int:
    from chaos.servers import RedisServer

    broker = run.broker
    if isinstance(broker, RedisServer):
        broker.kill()
        broker.start()  # empty: no persistence
    else:
        broker.close_connections()
    return 1


# --- messages ---------------------------------------------------------------------------


def replay_messages(run: Run, tick: int) -> int:
    """Send again step messages the saga outbox holds (sent long ago or just now: stale
    replays and duplicates of the current one), and start some orders a second time."""
    from celery_sagas.protocols import OutboxMessage

    total = REPLAYS_QUICK if run.spec.quick else REPLAYS
    ticks = max(1, len(run.case.times(run.spec.duration, run.spec.quick)))
    want = -(-total // ticks)
    with run.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT saga_id, body FROM saga_outbox WHERE key IS NOT NULL "
                "ORDER BY random() LIMIT :n"
            ),
            {"n": want},
        ).all()
    sent = 0
    for saga_id, body in rows:
        run.runtime.dispatcher.send(OutboxMessage(saga_id, body))
        sent += 1
    for order in run.rng.sample(run.submitted, min(len(run.submitted), max(0, want - sent))):
        run.start_saga.delay(order)
        sent += 1
    return sent


def _live_and_finished(run: Run) -> tuple[list[Any], list[Any]]:
    with run.engine.connect() as conn:
        live = conn.execute(
            sa.text(
                "SELECT id, current_step, token FROM saga WHERE state IN ('STARTED', 'PENDING') "
                "ORDER BY random() LIMIT 3"
            )
        ).all()
        done = conn.execute(
            sa.text("SELECT id FROM saga WHERE state = 'COMPLETED' ORDER BY random() LIMIT 1")
        ).all()
    return live, done


def _send(run: Run, index: int, role: str, kwargs: dict[str, Any]) -> None:
    saga = run.saga
    name = saga.step_task_name(index) if role == "action" else saga.compensation_task_name(index)
    run.app.send_task(name, kwargs=kwargs, ignore_result=True)


def _raw(run: Run, body: bytes, content_type: str, encoding: str) -> None:
    queue = run.app.amqp.queues[run.app.conf.task_default_queue]
    headers = {
        "lang": "py",
        "task": run.saga.step_task_name(0),
        "id": str(uuid.uuid4()),
        "root_id": None,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "eta": None,
        "expires": None,
        "argsrepr": "()",
        "kwargsrepr": "{}",
        "origin": "chaos",
        "ignore_result": True,
    }
    with run.app.connection_for_write() as conn:
        conn.Producer().publish(
            body,
            exchange=queue.exchange,
            routing_key=queue.routing_key,
            content_type=content_type,
            content_encoding=encoding,
            headers=headers,
            declare=[queue],
            retry=True,
        )


def forge_messages(run: Run, tick: int) -> int:
    """One round of forged messages: unknown saga, wrong step, wrong key, wrong role,
    finished saga, a body that is not JSON, and a pickle."""
    sent = 0
    step = tick % len(STEPS)
    fake = str(uuid.uuid4())
    _send(run, step, "action", _kwargs(fake, step, 1, "action"))
    sent += 1
    live, done = _live_and_finished(run)
    for saga_id, current, token in live:
        wrong = (current + 1) % len(STEPS)
        _send(run, wrong, "action", _kwargs(saga_id, current, token, "action"))  # wrong step
        _send(run, current, "action", {**_kwargs(saga_id, current, token, "action"), "key": "x"})
        _send(run, current, "compensation", _kwargs(saga_id, current, token, "compensation"))
        sent += 3
    for (saga_id,) in done:
        _send(run, 0, "action", _kwargs(saga_id, 0, 1, "action"))
        sent += 1
    _raw(run, b'{"not json', "application/json", "utf-8")
    body = pickle.dumps(((), _kwargs(fake, 0, 1, "action"), {}))
    _raw(run, body, "application/x-python-serialize", "binary")
    return sent + 2


def _kwargs(saga_id: str, step: int, token: int, role: str) -> dict[str, Any]:
    kwargs = {
        "saga_id": saga_id,
        "step": step,
        "token": token,
        "key": f"{saga_id}:{STEPS[step]}:{role}",
    }
    if role == "compensation":
        kwargs["attempts_before"] = 0
    return kwargs


# --- the cases --------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    times: Callable[[float, bool], list[float]]
    inject: Callable[[Run, int], int] | None = None
    beats: int = 1


CASES = {
    case.name: case
    for case in (
        Case("baseline", "no fault (control)", never),
        Case("child-kill", "SIGKILL a pool child every 2 s", every(2.0), kill_pool_child),
        Case(
            "worker-kill",
            "SIGKILL the whole worker every 30 s (8 s quick), restarted",
            every(30.0, 8.0),
            kill_worker,
        ),
        Case(
            "pg-restart",
            "pg_ctl restart -m immediate at 30% and 65%",
            at_fractions(0.3, 0.65),
            restart_postgres,
        ),
        Case(
            "pg-flap",
            "pg_ctl restart -m immediate every 8 s (4 s quick)",
            every(8.0, 4.0),
            restart_postgres,
        ),
        Case(
            "broker-restart",
            "Redis SIGKILLed and restarted empty / RabbitMQ connections closed, at 30% and 65%",
            at_fractions(0.3, 0.65),
            restart_broker,
        ),
        Case("hung", "create_shipment hangs (25%) or ignores its soft limit (10%)", never),
        Case("late-replies", "create_shipment finishes within 0.3 s of its timeout (50%)", never),
        Case("two-beats", "two beat processes scanning and relaying", never, beats=2),
        Case(
            "replay",
            f"{REPLAYS} replayed step messages and duplicate starts",
            every(0.5),
            replay_messages,
        ),
        Case(
            "forged",
            "forged: unknown saga, wrong step/key/role, finished saga, non-JSON, pickle",
            every(1.0),
            forge_messages,
        ),
    )
}


def describe() -> str:
    return "\n".join(f"  {c.name:<15} {c.what}" for c in CASES.values())


__all__ = ["CASES", "Case", "describe"]
