"""The pytest plugin (registered through the ``pytest11`` entry point, so installing
celery-sagas makes these fixtures available in your tests):

- ``saga_clock``: a ``FakeClock`` the test moves;
- ``saga_harness``: builds a ``SagaHarness`` for one of your sagas, on that clock::

      def test_payment_declined(saga_harness):
          harness = saga_harness(order_saga, faults=[Decline("charge")])
          assert harness.run({"id": "A-1"}).state == SagaState.FAILED

``assert_compensates_at_every_step(saga, payload)`` (``celery_sagas.testing``) needs no
fixture.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest

from celery_sagas.definition import Saga, StepFunction
from celery_sagas.testing.kit import FakeClock, Fault, SagaHarness


@pytest.fixture
def saga_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def saga_harness(saga_clock: FakeClock) -> Callable[..., SagaHarness]:
    def build(
        saga: Saga,
        faults: Sequence[Fault] = (),
        participants: Mapping[str, StepFunction] | None = None,
        **options: Any,
    ) -> SagaHarness:
        return SagaHarness(
            saga, faults=faults, clock=saga_clock, participants=participants or {}, **options
        )

    return build
