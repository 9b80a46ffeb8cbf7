"""Heartbeats of the steps without a timeout that this process is running.

A step with a timeout has a time of its own: once ``timeout + grace`` has passed since a
worker began it with no outcome, the scan knows its worker is gone (or its hard limit
ended it) and sends it again. An untimed step (``timeout=None``) may run for any time, so
its worker says it is alive instead: one daemon thread per process (a greenlet under
gevent) refreshes the ``started`` markers of the untimed steps running here, every
``interval`` seconds, in one store call. The scan counts the step's worker gone once
``HEARTBEATS_MISSED`` beats were missed (``SagaView.heartbeat_lease``) and re-sends it.

Celery-free: the step task's runner registers a run with ``beating``; the thread starts on
first use in each process (a prefork child starts its own after the fork).
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime

from celery_sagas.errors import StoreUnavailableError
from celery_sagas.log import logger
from celery_sagas.protocols import SagaStore
from celery_sagas.settings import HEARTBEATS_MISSED


def held_markers(running: Counter[tuple[str, str | None]]) -> dict[str, str | None]:
    """Pure: the markers to refresh, key → the delivery running it; None (whichever
    delivery holds it) when two deliveries of one key run here at once."""
    markers: dict[str, str | None] = {}
    for key, delivery in running:
        markers[key] = delivery if key not in markers else None
    return markers


class Heartbeats:
    """Refreshes the ``started`` markers of the untimed steps running in this process."""

    def __init__(
        self,
        store: Callable[[], SagaStore],
        interval: float,
        clock: Callable[[], datetime],
        lease: float | None = None,
    ) -> None:
        """``lease``: seconds after its last beat that a step's worker counts as gone
        (``SagaSettings.heartbeat_lease``; by default ``HEARTBEATS_MISSED`` intervals)."""
        self.store = store
        self.interval = interval
        self.clock = clock
        self.lease = lease if lease is not None else interval * HEARTBEATS_MISSED
        self._running: Counter[tuple[str, str | None]] = Counter()
        self._lock = threading.Lock()
        self._pid: int | None = None  # the process whose thread beats (none yet)

    @contextmanager
    def beating(self, key: str, delivery: str | None) -> Iterator[None]:
        """While the body runs, the marker of ``key`` held by ``delivery`` is refreshed."""
        self._start_once()
        with self._lock:
            self._running[(key, delivery)] += 1
        try:
            yield
        finally:
            with self._lock:
                self._running[(key, delivery)] -= 1
                if self._running[(key, delivery)] <= 0:
                    del self._running[(key, delivery)]

    def hold_until(self, store: SagaStore, key: str, delivery: str | None, at: datetime) -> None:
        """The step waits for a retry at ``at``: its worker counts as heard from then, so
        the wait is not taken for silence. A lost write only risks an early re-send."""
        try:
            store.beat_started({key: delivery}, at)
        except StoreUnavailableError as lost:
            logger.warning("celery-sagas: %s: retry wait not noted: %s", key, lost)

    def beat(self) -> int:
        """One beat: refresh every running step's marker. Returns how many were."""
        with self._lock:
            markers = held_markers(self._running)
        if not markers:
            return 0
        try:
            return self.store().beat_started(markers, self.clock())
        except Exception as failed:  # the next beat tries again; the thread must live on
            logger.warning("celery-sagas: heartbeat of %d step(s) failed: %s", len(markers), failed)
            return 0

    @property
    def running(self) -> int:
        with self._lock:
            return sum(self._running.values())

    def _start_once(self) -> None:
        pid = os.getpid()
        if self._pid == pid:
            return
        with self._lock:
            if self._pid == pid:
                return
            if self._pid is not None:  # a forked child: the parent's runs are not ours
                self._running.clear()
            self._pid = pid
            threading.Thread(target=self._loop, name="celery-sagas-heartbeat", daemon=True).start()

    def _loop(self) -> None:
        keep_signals_off_this_thread()
        stop = threading.Event()  # never set: the thread lives as long as its process
        while not stop.wait(self.interval):
            self.beat()


def keep_signals_off_this_thread() -> None:
    """Block SIGALRM in this (real, non-main) thread, so the kernel delivers the step
    alarm of an inline run (``integration.alarm``) to the main thread, interrupting a
    participant's blocking call there. A greenlet shares the main thread: left alone."""
    main = threading.main_thread().native_id
    if hasattr(signal, "pthread_sigmask") and threading.get_native_id() != main:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
