"""psycopg2 under gevent: the green wait callback, installed only when gevent patched
(and a check that psycopg 3 waits greenly by itself).

psycopg2 talks to PostgreSQL through libpq, in C: gevent's monkey-patching cannot reach its
sockets, so every query blocks the whole worker process (every greenlet) until PostgreSQL
answers. With a *wait callback* psycopg2 runs each query in libpq's non-blocking mode and
calls back to wait for the socket; waiting through ``gevent.socket`` lets the other
greenlets run meanwhile. That is what psycogreen's ``patch_psycopg()`` does; this module
does the same without the dependency.

psycopg 3 needs none of this: when it is imported after gevent patched (as under
``celery worker -P gevent``) it waits through the patched ``select`` by itself (3.1.14+);
imported before, it keeps its blocking C wait, which :func:`psycopg3_blocks` detects.

``celery worker -P gevent`` monkey-patches before it imports the app, so ``install()``
(and again the ``worker_init`` signal) can tell whether gevent is in charge. Under prefork,
threads or solo nothing is changed: a wait callback is process-wide state, and the
blocking driver is the right one there.
"""

from __future__ import annotations

import sys
from typing import Any

from celery_sagas.log import logger


def gevent_patched() -> bool:
    """Whether gevent's monkey-patching is active in this process (gevent is never
    imported here: a process that did not import it is not patched)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))


def gevent_wait(connection: Any, timeout: float | None = None) -> None:
    """psycopg2's wait callback: poll the connection, wait for its socket greenly."""
    from gevent.socket import wait_read, wait_write
    from psycopg2 import OperationalError, extensions

    while True:
        state = connection.poll()
        if state == extensions.POLL_OK:
            return
        if state == extensions.POLL_READ:
            wait_read(connection.fileno(), timeout=timeout)
        elif state == extensions.POLL_WRITE:
            wait_write(connection.fileno(), timeout=timeout)
        else:
            raise OperationalError(f"bad result from connection.poll(): {state!r}")


def make_psycopg2_green() -> bool:
    """Install :func:`gevent_wait` as psycopg2's wait callback if gevent patched this
    process and psycopg2 is installed. True if a green callback is in place (ours, or one
    already set, e.g. by psycogreen); safe to call more than once."""
    if not gevent_patched():
        return False
    try:
        from psycopg2 import extensions
    except ImportError:  # another driver (SQLite, psycopg 3): nothing to do
        return False
    if extensions.get_wait_callback() is None:
        extensions.set_wait_callback(gevent_wait)
        logger.info("celery-sagas: gevent is active: psycopg2 waits greenly")
    return True


def psycopg3_blocks() -> bool:
    """Whether psycopg 3 waits for PostgreSQL blocking the whole process although gevent
    patched it: psycopg chose its C wait at import, before gevent patched ``select``
    (False when gevent is not patching or psycopg 3 is not imported)."""
    waiting = sys.modules.get("psycopg.waiting")
    if not gevent_patched() or waiting is None:
        return False
    return getattr(waiting, "wait_c", None) is not None and waiting.wait is waiting.wait_c
