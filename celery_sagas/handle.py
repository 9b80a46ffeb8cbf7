"""A handle on one saga: what ``start_saga.delay(order)`` and ``sagas.get(ref)`` return.

It reads the saga database (no Celery result backend): ``state()``, ``outcome()`` and
``wait(timeout=…)``, which polls until the saga settles (COMPLETED, FAILED or
COMPENSATION_FAILED) and raises ``SagaTimeoutError`` if it does not in time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from celery_sagas.errors import AmbiguousSagaError, SagaNotFoundError, SagaTimeoutError
from celery_sagas.machine import SagaState
from celery_sagas.outcomes import SagaOutcome, outcome_of
from celery_sagas.protocols import SagaRecord

DEFAULT_WAIT = 60.0


class SagaReader(Protocol):
    def load(self, saga_id: str) -> SagaRecord | None: ...

    def keyed(self, business_key: str) -> tuple[SagaRecord, ...]:
        """The sagas of every type whose business key is ``business_key``."""
        ...


def find(reader: SagaReader, ref: str, name: str | None = None) -> SagaRecord:
    """The saga whose id is ``ref``, else the one of type ``name`` whose business key is
    ``ref``. Without ``name``, a key used by sagas of several types is an error that lists
    them, never a silent pick."""
    if not ref or "\x00" in ref:
        raise SagaNotFoundError(f"no saga has the id or business key {ref!r}", ref=ref)
    record = reader.load(ref)
    if record is not None and (name is None or record.name == name):
        return record
    matches = [r for r in reader.keyed(ref) if name is None or r.name == name]
    if not matches:
        where = f" of type {name!r}" if name else ""
        raise SagaNotFoundError(f"no saga{where} with id or business key {ref!r}", ref=ref)
    if len(matches) > 1:
        found = ", ".join(f"{r.name} (saga {r.saga_id})" for r in matches)
        raise AmbiguousSagaError(
            f"business key {ref!r} is used by several saga types: {found}; pass name=...",
            ref=ref,
            names=sorted(r.name for r in matches),
        )
    return matches[0]


class SagaHandle:
    """``id`` and ``saga_id`` are the saga id (code reading an AsyncResult's ``.id``
    keeps working). ``created`` is False when the start found the saga already there
    (same business key, same payload)."""

    def __init__(
        self,
        reader: SagaReader,
        saga_id: str,
        created: bool = False,
        publish: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.reader = reader
        self.saga_id = saga_id
        self.created = created
        self._publish = publish
        self._clock = clock
        self._sleep = sleep

    @property
    def id(self) -> str:
        return self.saga_id

    def __repr__(self) -> str:
        return f"<SagaHandle {self.saga_id}>"

    def outcome(self) -> SagaOutcome:
        record = self.reader.load(self.saga_id)
        if record is None:
            raise SagaNotFoundError(
                f"saga {self.saga_id} does not exist (was the transaction that started it "
                "rolled back?)",
                saga_id=self.saga_id,
            )
        return outcome_of(record)

    def state(self) -> SagaState:
        return self.outcome().state

    def wait(self, timeout: float = DEFAULT_WAIT, interval: float = 0.1) -> SagaOutcome:
        """Poll the saga database until the saga settles; its outcome."""
        deadline = self._clock() + timeout
        while True:
            outcome = self.outcome()
            if outcome.settled:
                return outcome
            if self._clock() >= deadline:
                raise SagaTimeoutError(
                    f"saga {self.saga_id} did not settle within {timeout:g}s "
                    f"(it is {outcome.state.value})",
                    saga_id=self.saga_id,
                    state=outcome.state.value,
                )
            self._sleep(interval)

    def get(self, timeout: float | None = None, **_: object) -> SagaOutcome:
        """``AsyncResult.get`` compatible: ``wait``."""
        return self.wait(DEFAULT_WAIT if timeout is None else timeout)

    def publish(self) -> int:
        """Publish the saga's first message now: after committing the transaction it was
        started in (``connection=``), instead of leaving it to the relay. Harmless twice."""
        return self._publish() if self._publish is not None else 0
