"""``python -m chaos --inline-steps``: the same cases with the order saga in inline mode.

Inline mode needs steps without a Celery time limit: the chaos app (``chaos.app``) declares
the order saga's steps ``timeout=None`` and the worker runs with ``SAGAS_INLINE_STEPS=true``,
so a saga's next step runs in the delivery of the step before it. Some cases cannot apply
to steps without a timeout, and this module says which (pure: no servers, no app):

- a case whose faults *are* a step's time limit (``hung``: create_shipment interrupted at
  its soft limit or killed at its hard limit; ``late-replies``: its reply races that limit)
  keeps create_shipment's timeout (its action's and its compensation's time limits). Those
  two tasks, and the step after each, are then published as before (a delivery under a
  time limit runs nothing inline, and nothing runs inline into a task with one);
  reserve_inventory -> process_payment and refund_payment -> release_inventory still run
  inline.
- every other case runs with every step untimed, on both brokers. ``worker-kill`` and
  ``broker-restart`` on Redis were skipped before untimed steps had a backstop: Redis holds
  a SIGKILLed worker's unacknowledged messages for its visibility timeout (one hour) and
  loses them all when it restarts empty. Now the scan re-sends an untimed step's message
  no worker began after ``resend_untimed_after``, and a begun one once its worker stopped
  beating (``heartbeat_interval``; ``chaos.case.SETTINGS`` shortens both).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from chaos.orders import SHIPMENT_TIMEOUT

if TYPE_CHECKING:
    from celery_sagas import Saga

SAGA = "order_fulfillment"
# what the chaos app reads: declare the order saga's steps without a time limit
UNTIMED_ENV = "CHAOS_UNTIMED_STEPS"

# cases whose faults are create_shipment's time limit: they keep it
KEEP_TIMEOUTS: Mapping[str, tuple[Mapping[str, float], str]] = {
    "hung": (
        {f"{SAGA}.create_shipment": SHIPMENT_TIMEOUT},
        "its faults are create_shipment's soft and hard time limits",
    ),
    "late-replies": (
        {f"{SAGA}.create_shipment": SHIPMENT_TIMEOUT},
        "its replies race create_shipment's time limit",
    ),
}

# (case, broker) → why the case cannot run in inline mode (none at present)
SKIP: Mapping[tuple[str, str], str] = {}


@dataclass(frozen=True)
class InlinePlan:
    """How one case runs in inline mode: skipped (``skip`` says why), or run with the
    order saga's steps untimed except ``timeouts`` (``"saga.step"``: seconds)."""

    case: str
    broker: str
    timeouts: Mapping[str, float] = field(default_factory=dict)
    why_timed: str = ""
    skip: str | None = None
    untimed: bool = True  # the order saga's steps declared timeout=None (else: as configured)

    def note(self) -> str:
        """One line for the output: what inline mode changes for this case."""
        where = f"{self.case}/{self.broker}"
        if self.skip is not None:
            return f"{where}: skipped in inline mode: {self.skip}"
        if not self.untimed:
            return f"{where}: inline, every step keeps its timeout (the worker times it)"
        if not self.timeouts:
            return f"{where}: inline, every step of {SAGA} without a time limit"
        timed = ", ".join(f"{k.split('.', 1)[1]} {v:g} s" for k, v in self.timeouts.items())
        return (
            f"{where}: inline, but keeps {timed} ({self.why_timed}): the prefork worker times "
            "that step itself, inline; the steps before it run without a time limit"
        )

    def table_note(self) -> str:
        """A short form for the table's notes column."""
        if not self.untimed:
            return "inline, timed"
        if not self.timeouts:
            return "inline"
        return "inline; " + ", ".join(
            f"{k.split('.', 1)[1]} timed {v:g} s" for k, v in self.timeouts.items()
        )


def plan(case: str, broker: str, untimed: bool = True) -> InlinePlan:
    """Pure: what ``--inline-steps`` does with ``case`` on ``broker``; ``untimed=False``
    (``--timed-steps``): the steps keep their timeouts."""
    skip = SKIP.get((case, broker))
    if skip is not None:
        return InlinePlan(case, broker, skip=skip)
    if not untimed:
        return InlinePlan(case, broker, untimed=False)
    timeouts, why = KEEP_TIMEOUTS.get(case, ({}, ""))
    return InlinePlan(case, broker, dict(timeouts), why)


def environment(plan_: InlinePlan) -> dict[str, str]:
    """The settings a case's processes get in inline mode (over ``chaos.case.SETTINGS``):
    inline steps on, the saga's steps declared untimed, only the kept timeouts given (or,
    with ``--timed-steps``, every step's timeout as configured)."""
    if not plan_.untimed:
        return {"SAGAS_INLINE_STEPS": "true"}
    return {
        "SAGAS_INLINE_STEPS": "true",
        UNTIMED_ENV: "1",
        "SAGAS_STEP_TIMEOUTS": json.dumps(dict(plan_.timeouts)),
    }


def untimed(saga: Saga) -> Saga:
    """``saga`` with every step declared without a time limit (``timeout=None``): same
    step and task names, same fingerprint (the timeout is not part of it)."""
    return replace(saga, steps=tuple(replace(step, timeout=None) for step in saga.steps))


__all__ = ["InlinePlan", "environment", "plan", "untimed"]
