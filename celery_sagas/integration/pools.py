"""What the worker's pool means for sagas, set up and said once as a worker starts.

- ``-P gevent``: psycopg2 must wait greenly (``green.make_psycopg2_green``), or every
  query blocks every greenlet of the process; psycopg 3 does by itself if it was imported
  after gevent patched (``green.psycopg3_blocks`` warns otherwise).
- Time limits: prefork enforces both of a step task's limits (the soft one interrupts the
  participant at its timeout, the hard one replaces the child ``time_limit_grace`` later);
  gevent only the hard one (a ``gevent.Timeout`` in the greenlet, recorded by the task's
  ``on_failure``); threads and solo neither. There the saga's own deadline is the backstop:
  the scan times a step out once ``timeout + time_limit_grace`` passed since a worker began
  it with no outcome, after re-sending it ``max_redispatches`` times first (a silent step
  is taken for one whose worker died). A thread is not dead, only late, so a hung call
  then holds its thread, and every re-send one more: a worker warns about it.
- The saga database's connection pool: a prefork child runs one task at a time, but a
  threads or gevent worker runs ``-c`` of them in one process, sharing one engine. Its
  default pool (5 + 10 overflow) would make most of them queue for a connection, so such a
  worker sizes it by its concurrency (at most ``MAX_ENGINE_POOL``, PostgreSQL's
  ``max_connections`` is 100 by default) unless ``sagas_engine_options`` sets
  ``pool_size``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery, signals

from celery_sagas.integration.green import make_psycopg2_green, psycopg3_blocks
from celery_sagas.log import logger

SOFT_LIMIT_POOLS = frozenset({"prefork"})
HARD_LIMIT_POOLS = frozenset({"prefork", "gevent"})
SHARED_PROCESS_POOLS = frozenset({"threads", "gevent", "eventlet"})  # -c tasks, one engine
# per engine: the store has two (transactions, and autocommit single-statement writes)
MAX_ENGINE_POOL = 20
ENGINE_POOL_OVERFLOW = 10
_POOL_MODULES = {
    "celery.concurrency.prefork": "prefork",
    "celery.concurrency.thread": "threads",
    "celery.concurrency.gevent": "gevent",
    "celery.concurrency.eventlet": "eventlet",
    "celery.concurrency.solo": "solo",
}


def pool_name(pool_cls: Any) -> str:
    """``prefork``, ``threads``, ``gevent``, ``eventlet``, ``solo`` or the class's path,
    from a worker's ``pool_cls`` (an alias, a ``module:Class`` path or the class)."""
    if isinstance(pool_cls, str):
        if pool_cls == "processes":  # Celery's old alias of prefork
            return "prefork"
        return _POOL_MODULES.get(pool_cls.partition(":")[0], pool_cls)
    module = getattr(pool_cls, "__module__", "")
    return _POOL_MODULES.get(module, f"{module}.{getattr(pool_cls, '__name__', '?')}")


def engine_pool_for(pool: str, concurrency: int) -> dict[str, int]:
    """The engine's pool a worker of ``pool`` and ``concurrency`` needs (pure): none
    beyond the default for one task per process."""
    if pool not in SHARED_PROCESS_POOLS:
        return {}
    size = max(5, min(concurrency, MAX_ENGINE_POOL))
    return {"pool_size": size, "max_overflow": ENGINE_POOL_OVERFLOW}


@dataclass(frozen=True)
class PoolNote:
    level: str  # "info" | "warning"
    text: str


def pool_notes(
    pool: str,
    timed_steps: bool,
    max_redispatches: int,
    green: bool,
    engine_pool: dict[str, int] | None = None,
) -> list[PoolNote]:
    """What a worker of ``pool`` says about sagas as it starts (pure)."""
    notes = []
    if engine_pool:
        notes.append(
            PoolNote(
                "info",
                f"-P {pool}: the saga database's engine pools hold "
                f"{engine_pool['pool_size']} connections (+{engine_pool['max_overflow']})",
            )
        )
    if pool == "gevent" and green:
        notes.append(PoolNote("info", "-P gevent: psycopg2 waits greenly"))
    if timed_steps and pool not in SOFT_LIMIT_POOLS:
        enforced = "only the hard one" if pool in HARD_LIMIT_POOLS else "none"
        text = (
            f"-P {pool}: of Celery's time limits of step tasks, {enforced} is enforced; "
            "step timeouts rely on the saga's deadline (the scan, at timeout + "
            "time_limit_grace after a worker began the step)"
        )
        if pool not in HARD_LIMIT_POOLS and max_redispatches > 0:
            text += (
                f", and a hung step is re-sent {max_redispatches} time(s) before it is timed "
                "out, each re-send holding one more thread: set sagas_max_redispatches=0"
            )
            notes.append(PoolNote("warning", text))
        else:
            notes.append(PoolNote("info", text))
    return notes


def watch_pools(
    app: Celery,
    timed_steps: bool,
    max_redispatches: int,
    size_engine_pool: Callable[[dict[str, int]], dict[str, int]],
) -> None:
    """Make psycopg2 green now if gevent patched already (``celery worker -P gevent``
    patches before it imports the app), again when a worker of ``app`` initialises, size
    the engine's pool for its concurrency then (``size_engine_pool``), and say what its
    pool means for sagas when it is ready."""
    make_psycopg2_green()
    sized: dict[str, int] = {}

    def on_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app:
            return
        make_psycopg2_green()
        concurrency = getattr(sender, "concurrency", None)
        if isinstance(concurrency, int):
            wanted = engine_pool_for(pool_name(sender.pool_cls), concurrency)
            sized.update(size_engine_pool(wanted))

    def on_ready(sender: Any = None, **_: Any) -> None:
        controller = getattr(sender, "controller", None)
        if getattr(sender, "app", None) is not app or controller is None:
            return
        pool = pool_name(controller.pool_cls)
        green = make_psycopg2_green()
        if pool == "gevent" and psycopg3_blocks():
            logger.warning(
                "celery-sagas: -P gevent: psycopg 3 was imported before gevent patched: "
                "its queries block every greenlet (import it after monkey-patching, or "
                "set PSYCOPG_WAIT_FUNC=wait_poll)"
            )
        for note in pool_notes(pool, timed_steps, max_redispatches, green, sized):
            log = logger.warning if note.level == "warning" else logger.info
            log("celery-sagas: %s", note.text)

    signals.worker_init.connect(on_init, weak=False)
    signals.worker_ready.connect(on_ready, weak=False)
