"""Each step's own time limits, enforced by the worker process itself in an inline run.

Celery's time limits are per delivery: its pool times a delivery from its start. In an
inline run a saga's steps run one after the other in one delivery, so Celery's limits
cannot be each step's. With ``inline_steps`` a timed step's message therefore carries, as
both its limits, the budget of the longest inline run it can begin (``inline.budget``),
and the worker gives every timed step of the run its own limits with a process alarm
(SIGALRM, ``setitimer``):

- at the step's timeout the participant is interrupted with Celery's
  ``SoftTimeLimitExceeded``, as Celery's soft limit would (the step timed out);
- if it swallows that, ``time_limit_grace`` later it gets ``StepHardLimitExceeded``, a
  ``BaseException`` that ``except Exception`` does not catch (the step timed out; its
  process lives on, where Celery's hard limit would have replaced it);
- an action stuck where Python cannot raise (a C call that retries on EINTR, such as a
  libpq query, or code that swallows even the hard limit) is ended by a watchdog thread
  ``STUCK_AFTER`` seconds past its hard limit: it records the step timed out (as the
  task's ``on_failure`` does after Celery's hard limit) and SIGKILLs its own pool child,
  which Celery replaces; the message comes back and finds the outcome recorded. A stuck
  compensation, and code that holds the GIL, are left to the message's budget (Celery's
  hard limit; ``on_failure`` records the step that was running) and to the scan.

Only a prefork pool child arms the alarm: a process of its own that runs its tasks in its
main thread, the only thread a signal handler runs in. Under threads, gevent and solo a
timed step is never run inline (it is published, as before). Under gevent a budgeted
message's own step still gets its own hard limit, as Celery's gevent pool gives it: a
``gevent.Timeout`` in its greenlet (``green_hard_limit``); threads and solo never had one.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from celery.exceptions import SoftTimeLimitExceeded

from celery_sagas.errors import StepHardLimitExceeded
from celery_sagas.heartbeat import keep_signals_off_this_thread
from celery_sagas.log import logger

# set in a worker's environment by ``worker_init``: its pool (pool children inherit it)
POOL_ENV = "CELERY_SAGAS_POOL"
# seconds past an action's hard limit after which the watchdog ends a process stuck in it
STUCK_AFTER = 1.0


class Watchdog:
    """One thread per process. Armed with a deadline and what to do then (record the
    step's timeout), it does that once the deadline passes, and SIGKILLs the process: the
    participant did not return even at its hard limit. Arming and disarming take a lock
    and a notify: no thread is made per step."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: tuple[float, Callable[[], None]] | None = None
        self._pid: int | None = None

    def arm(self, seconds: float, on_stuck: Callable[[], None]) -> None:
        self._start_once()
        with self._cond:
            self._armed = (time.monotonic() + seconds, on_stuck)
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._armed = None
            self._cond.notify()

    def _start_once(self) -> None:
        pid = os.getpid()
        if self._pid == pid:
            return
        self._pid = pid
        self._cond = threading.Condition()  # a forked child's own
        self._armed = None
        threading.Thread(target=self._watch, name="celery-sagas-watchdog", daemon=True).start()

    def _watch(self) -> None:
        keep_signals_off_this_thread()
        while True:
            with self._cond:
                armed = self._armed
                if armed is None:
                    self._cond.wait()
                    continue
                left = armed[0] - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self._armed = None
            try:
                armed[1]()
            except Exception as failed:  # the scan's own deadline times the step out
                logger.warning("celery-sagas: a stuck step's timeout not recorded: %s", failed)
            logger.error("celery-sagas: a step stuck past its hard time limit: killing process")
            os.kill(os.getpid(), signal.SIGKILL)


WATCHDOG = Watchdog()


def alarm_usable() -> bool:
    """Whether this process may time steps itself: a prefork child, in its main thread."""
    return (
        os.environ.get(POOL_ENV) == "prefork"
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )


def green_usable() -> bool:
    """Whether this process runs its tasks in greenlets (``-P gevent``)."""
    return os.environ.get(POOL_ENV) == "gevent"


@contextmanager
def green_hard_limit(hard: float) -> Iterator[None]:
    """``StepHardLimitExceeded`` in this greenlet at ``hard`` seconds (gevent)."""
    import gevent

    with gevent.Timeout(hard, StepHardLimitExceeded(f"hard time limit ({hard:g}s) exceeded")):
        yield


@contextmanager
def step_limits(
    soft: float, hard: float, on_stuck: Callable[[], None] | None = None
) -> Iterator[None]:
    """While the body runs: ``SoftTimeLimitExceeded`` at ``soft`` seconds, then
    ``StepHardLimitExceeded`` at ``hard``, then (``on_stuck`` given) the watchdog
    ``STUCK_AFTER`` later. The alarm is disarmed and the previous SIGALRM handler restored
    on the way out.

    An alarm already due when the body ends runs its handler during that teardown: it
    then does nothing (the body is over), so it can neither re-arm the timer nor abort
    the teardown, which would leave the hard alarm to go off in the code after the step."""
    state = {"fired": False, "over": False}

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        if state["over"]:
            return
        if not state["fired"]:
            state["fired"] = True
            signal.setitimer(signal.ITIMER_REAL, max(hard - soft, 0.001))
            raise SoftTimeLimitExceeded(f"soft time limit ({soft:g}s) exceeded")
        raise StepHardLimitExceeded(f"hard time limit ({hard:g}s) exceeded")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    if on_stuck is not None:
        WATCHDOG.arm(hard + STUCK_AFTER, on_stuck)
    signal.setitimer(signal.ITIMER_REAL, soft)
    try:
        yield
    finally:
        state["over"] = True  # a subscript store: no handler runs before it
        signal.setitimer(signal.ITIMER_REAL, 0)
        if on_stuck is not None:
            WATCHDOG.disarm()
        signal.signal(signal.SIGALRM, previous)
