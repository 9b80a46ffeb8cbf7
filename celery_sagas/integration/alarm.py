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
- a participant stuck where Python cannot raise (inside C code that holds the GIL) is
  ended by the message's budget, Celery's hard limit (``on_failure`` records the step
  that was running), and the scan's own deadline for the step covers it before that.

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
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from celery.exceptions import SoftTimeLimitExceeded

from celery_sagas.errors import StepHardLimitExceeded

# set in a worker's environment by ``worker_init``: its pool (pool children inherit it)
POOL_ENV = "CELERY_SAGAS_POOL"


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
def step_limits(soft: float, hard: float) -> Iterator[None]:
    """While the body runs: ``SoftTimeLimitExceeded`` at ``soft`` seconds, then
    ``StepHardLimitExceeded`` at ``hard``. The alarm is disarmed and the previous SIGALRM
    handler restored on the way out.

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
    signal.setitimer(signal.ITIMER_REAL, soft)
    try:
        yield
    finally:
        state["over"] = True  # a subscript store: no handler runs before it
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
