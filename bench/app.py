"""The benchmark's Celery app: ``celery -A bench.app worker``.

One app, one worker, one queue for both workloads:

- ``bench_noop``: a 4-step saga whose actions and compensations are no-ops (5 task hops:
  start + 4 steps; 9 with ``SAGAS_COORDINATOR_HOP=true``, each step followed by
  ``celery_sagas.advance``). Completion is read from the ``saga`` table.
- ``bench.noop_1`` .. ``bench.noop_4``: the bare-chain baseline (4 task hops). The last task
  records its completion in Redis (``ZADD`` of the completion time under the chain id), the
  minimal completion signal that needs no result backend.

Configured from the environment: ``CELERY_BROKER_URL``, ``SAGAS_DATABASE_URL``,
``BENCH_REDIS_URL`` (where chain completions go; defaults to the broker URL),
``BENCH_CHAIN_ACKS_LATE`` (``true``: the chain tasks ack late, as saga tasks do),
``SAGAS_INLINE_STEPS`` (``true``: a saga's later steps run inline, in its first step's
delivery), ``BENCH_UNTIMED_STEPS`` (``true``: the saga's steps are declared without a
timeout, ``timeout=None``; else the default 300 s, which a prefork worker enforces
itself for inline steps) and
``BENCH_STEP_MS``: every saga step, compensation and chain task first waits that many
milliseconds, as a call to another service would (``time.sleep``: under ``-P gevent``,
which monkey-patched it, a green sleep that lets the other greenlets run).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import redis
from celery import Celery

from celery_sagas import Saga, Step, StepContext, install

CHAIN_DONE_KEY = "bench:chains:done"
SAGA_NAME = "bench_noop"
STEP_SECONDS = float(os.environ.get("BENCH_STEP_MS") or 0) / 1000
# the saga's steps without a timeout (a chain's tasks have no time limit either)
UNTIMED = os.environ.get("BENCH_UNTIMED_STEPS") == "true"


def chain_delivery(environ: Mapping[str, str]) -> dict[str, bool]:
    """The chain tasks' delivery options: Celery's defaults, or (``--chain-acks-late``,
    ``BENCH_CHAIN_ACKS_LATE=true``) acked after they run, as saga tasks are."""
    if environ.get("BENCH_CHAIN_ACKS_LATE") == "true":
        return {"acks_late": True, "reject_on_worker_lost": True}
    return {}


CHAIN_DELIVERY = chain_delivery(os.environ)

app = Celery("bench")
app.conf.broker_url = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/12")
app.conf.task_ignore_result = True
app.conf.broker_connection_retry_on_startup = True


# --- the saga -------------------------------------------------------------------------


def io_wait() -> None:
    """The step's call to another service (``BENCH_STEP_MS``)."""
    if STEP_SECONDS:
        time.sleep(STEP_SECONDS)


def act(context: StepContext) -> dict[str, Any]:
    io_wait()
    return {"ok": context.step}


def undo(context: StepContext) -> dict[str, Any]:
    io_wait()
    return {"undone": context.step}


def noop_step(name: str) -> Step:
    limit: dict[str, Any] = {"timeout": None} if UNTIMED else {}
    return Step(name, action=act, compensation=undo, compensation_name=f"undo_{name}", **limit)


bench_saga = Saga(SAGA_NAME, steps=[noop_step(f"step_{i}") for i in range(1, 5)])

runtime = install(app, [bench_saga], database_url=os.environ.get("SAGAS_DATABASE_URL"))
start_saga = runtime.start_task(SAGA_NAME)


# --- the bare-chain baseline ------------------------------------------------------------

_completions: redis.Redis | None = None


def completions() -> redis.Redis:
    """The Redis client chain completions are written to (one per process, made on use)."""
    global _completions
    if _completions is None:
        url = os.environ.get("BENCH_REDIS_URL") or app.conf.broker_url
        _completions = redis.Redis.from_url(url)
    return _completions


@app.task(name="bench.noop_1", **CHAIN_DELIVERY)
def noop_1() -> None:
    io_wait()


@app.task(name="bench.noop_2", **CHAIN_DELIVERY)
def noop_2() -> None:
    io_wait()


@app.task(name="bench.noop_3", **CHAIN_DELIVERY)
def noop_3() -> None:
    io_wait()


@app.task(name="bench.noop_4", **CHAIN_DELIVERY)
def noop_4(_previous: None, chain_id: str) -> None:
    io_wait()
    completions().zadd(CHAIN_DONE_KEY, {chain_id: time.time()})
